"""`centralize_gradients` for plain PyTorch loops."""

import inspect
import warnings

import pytest
import torch
from models import LAYOUTS, TinyConvNet, make_batches
from reference import gc_reference, row_mean_reference
from torch import nn

from lightning_gc import centralize_gradients


def grads_of(model):
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_module_gradients_match_reference_and_others_are_untouched():
    model = TinyConvNet().double()
    x, y = make_batches(1)[0]
    nn.functional.cross_entropy(model(x.double()), y).backward()
    before = grads_of(model)
    stats = centralize_gradients(model, compute_stats=True)
    after = grads_of(model)
    for name, grad in before.items():
        if name in LAYOUTS:
            torch.testing.assert_close(after[name], gc_reference(grad, *LAYOUTS[name]))
        else:
            torch.testing.assert_close(after[name], grad)
    assert stats.tensors == 3
    centralized = torch.cat([before[n].flatten() for n in LAYOUTS])
    removed = torch.cat([(before[n] - after[n]).flatten() for n in LAYOUTS])
    torch.testing.assert_close(stats.grad_norm.double(), centralized.norm())
    torch.testing.assert_close(stats.removed_norm_ratio.double(), removed.norm() / centralized.norm())


def test_parameter_iterable_uses_the_dimension_rule_only():
    model = TinyConvNet().double()
    x, y = make_batches(1)[0]
    nn.functional.cross_entropy(model(x.double()), y).backward()
    up_grad = model.up.weight.grad.clone()
    centralize_gradients(model.parameters())
    torch.testing.assert_close(model.up.weight.grad, gc_reference(up_grad, out_dim=0))


def test_rows_of_weights_keep_their_mean_under_sgd_with_momentum():
    model = TinyConvNet().double()
    initial = {n: row_mean_reference(p, *LAYOUTS[n]) for n, p in model.named_parameters() if n in LAYOUTS}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True)
    for x, y in make_batches(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x.double()), y).backward()
        centralize_gradients(model)
        optimizer.step()
    params = dict(model.named_parameters())
    for name, mean in initial.items():
        torch.testing.assert_close(row_mean_reference(params[name], *LAYOUTS[name]), mean, rtol=0, atol=1e-12)
    assert not torch.equal(params["head.weight"].detach().double(), initial["head.weight"])


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop])
@pytest.mark.parametrize("maximize", [False, True])
def test_centralize_weight_decay_gives_the_papers_update(optimizer_cls, maximize):
    """The optimizer must see GC(g + lambda * w): compared with the same optimizer fed that gradient, no decay."""
    lam = 0.05
    ours, theirs = TinyConvNet().double(), TinyConvNet().double()
    theirs.load_state_dict(ours.state_dict())
    kwargs = {"lr": 0.01, "maximize": maximize}
    if optimizer_cls is torch.optim.SGD:
        kwargs["momentum"] = 0.9
    opt_ours = optimizer_cls(ours.parameters(), weight_decay=lam, **kwargs)
    opt_theirs = optimizer_cls(theirs.parameters(), weight_decay=0.0, **kwargs)
    sign = -1.0 if maximize else 1.0
    for x, y in make_batches(5):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x.double()), y).backward()
        centralize_gradients(ours, optimizer=opt_ours, centralize_weight_decay=True)
        for name, p in theirs.named_parameters():
            # what the optimizer adds internally: (sign * g) + lambda * w, centralized; then undo the sign
            decayed = sign * p.grad.double() + lam * p.detach().double()
            p.grad = sign * (gc_reference(decayed, *LAYOUTS[name]) if name in LAYOUTS else decayed)
        opt_ours.step()
        opt_theirs.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_centralize_weight_decay_warns_that_adamw_decay_is_decoupled():
    model = TinyConvNet()
    optimizer = torch.optim.AdamW(model.parameters(), weight_decay=0.1)
    with pytest.warns(UserWarning, match="decoupled"):
        centralize_gradients(model, optimizer=optimizer, centralize_weight_decay=True)


def test_centralize_weight_decay_requires_the_optimizer():
    with pytest.raises(ValueError, match="optimizer"):
        centralize_gradients(TinyConvNet(), centralize_weight_decay=True)


def test_nothing_to_centralize_warns():
    with pytest.warns(UserWarning, match="nothing to centralize"):
        centralize_gradients(nn.Sequential(nn.Embedding(5, 3), nn.LayerNorm(3)))


def test_unmatched_exclude_pattern_warns_with_the_pattern():
    with pytest.warns(UserWarning, match=r"\['decoder\.\*'\]"):
        centralize_gradients(TinyConvNet(), exclude=["decoder.*"])


def _next_line() -> int:
    return inspect.currentframe().f_back.f_lineno + 1


def _only_warning(record, match):
    ours = [w for w in record if match in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in record]
    return ours[0]


def test_warnings_point_at_the_line_that_called_centralize_gradients():
    # plan-time warnings: raised while the plan cache builds the plan, several frames down
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = _next_line()
        centralize_gradients(nn.Sequential(nn.Embedding(5, 3), nn.LayerNorm(3)))
    warning = _only_warning(record, "nothing to centralize")
    assert (warning.filename, warning.lineno) == (__file__, line)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = _next_line()
        centralize_gradients(TinyConvNet(), exclude=["decoder.*"])
    warning = _only_warning(record, "decoder.*")
    assert (warning.filename, warning.lineno) == (__file__, line)

    model = TinyConvNet()
    optimizer = torch.optim.AdamW(model.parameters(), weight_decay=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = _next_line()
        centralize_gradients(model, optimizer=optimizer, centralize_weight_decay=True)
    warning = _only_warning(record, "decoupled")
    assert (warning.filename, warning.lineno) == (__file__, line)


def test_step_time_warnings_point_at_the_calling_line():
    # raised from `apply`, not while planning: a different depth
    model = nn.Embedding(10, 3, sparse=True)
    model(torch.tensor([1, 2])).sum().backward()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = _next_line()
        centralize_gradients(model, exclude_modules=())
    warning = _only_warning(record, "sparse")
    assert (warning.filename, warning.lineno) == (__file__, line)


def test_sparse_gradients_are_skipped_with_a_warning():
    model = nn.Embedding(10, 3, sparse=True)
    model(torch.tensor([1, 2])).sum().backward()
    before = model.weight.grad.to_dense().clone()
    with pytest.warns(UserWarning, match="sparse"):
        centralize_gradients(model, exclude_modules=())
    torch.testing.assert_close(model.weight.grad.to_dense(), before)
