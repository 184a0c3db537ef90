"""describe() and SelectionReport: one row per parameter, the user's names, a compact table and summary."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gc import SelectionReport, centralize_gradients, describe
from lightning_gc.selection import user_name


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


class DistributedDataParallel(nn.Module):  # named like torch's: the name is what marks a `.module` wrapper
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


class Fabricish(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._forward_module = module


def test_one_row_per_parameter_with_decision_dims_and_reason():
    report = describe(Net())
    assert [(r.name, r.decision, r.dims) for r in report.rows] == [
        ("embed.weight", "skipped", ()),
        ("body.weight", "centralized", (1,)),
        ("body.bias", "skipped", ()),
        ("head.weight", "centralized", (1,)),
        ("head.bias", "skipped", ()),
    ]
    assert report.rows[0].module == "Embedding" and "exclude_modules" in report.rows[0].reason
    assert report.counts() == {"centralized": (2, 24), "assumed": (0, 0), "skipped": (3, 46)}


def test_str_is_a_table_and_a_summary():
    text = str(describe(Net()))
    header, *rows, blank, summary = text.splitlines()
    assert header.split() == ["name", "shape", "module", "decision", "dims", "reason"]
    assert len(rows) == 5 and blank == ""
    assert summary == "GradientCentralization: 2 centralized (24), 0 assumed (0), 3 skipped (46)"
    assert "| body.weight | (4, 4) | Linear | centralized | (1,) |" in describe(Net()).markdown()


@pytest.mark.parametrize("wrap", [DistributedDataParallel, Fabricish, torch.compile])
def test_wrapper_prefixes_are_stripped_for_exclude_and_in_the_report(wrap):
    wrapped = wrap(Net())
    report = describe(wrapped, exclude=["head.*"])
    assert [r.name for r in report.rows] == ["embed.weight", "body.weight", "body.bias", "head.weight", "head.bias"]
    assert [r.name for r in report.by_decision("centralized")] == ["body.weight"]
    assert not report.unmatched_patterns


def test_exclude_with_wrapped_names_in_centralize_gradients():
    model = Fabricish(DistributedDataParallel(Net()))
    for p in model.parameters():
        p.grad = torch.randn_like(p) + 1.0
    before = model._forward_module.module.head.weight.grad.clone()
    centralize_gradients(model, exclude=["head.*"])
    assert torch.equal(model._forward_module.module.head.weight.grad, before)


def test_a_user_attribute_named_module_is_kept():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(3, 2)

    assert describe(Holder()).rows[0].name == "module.weight"


def test_user_name_strips_wrapper_components():
    assert user_name("module._fsdp_wrapped_module.layer._checkpoint_wrapped_module.weight") == "layer.weight"
    assert user_name("_orig_mod.head.weight") == "head.weight"


def test_report_of_bare_parameters_and_of_an_optimizer():
    model = Net()
    report = describe(model.parameters())
    assert [r.decision for r in report.rows if r.decision != "skipped"] == ["assumed"] * 3
    assert "assumed = dim 0" in report.summary()
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1)
    assert [r.name for r in describe(model, optimizer=optimizer).rows] == ["head.weight", "head.bias"]


def test_reports_are_values():
    assert isinstance(describe(Net()), SelectionReport)
    assert describe(Net()) == describe(Net())
