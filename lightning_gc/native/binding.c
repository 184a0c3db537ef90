/* The kernel's Python entry point: check every gradient of a plan against the geometry its job was planned
 * for, and only if all of them match, centralize them in one call of lgc_centralize (kernel.c).
 *
 * Why C: a training step's backward pass evicts the interpreter from the CPU caches, so every Python-level
 * attribute read, list built and ctypes argument converted in the step's hook costs a cache miss or several.
 * Measured on the digits template's step (4 weights), the Python checks and the ctypes call took 70-80 us
 * cold against 10 us warm; this function does the same reads in one C call. It trusts nothing it has not
 * just read: the tensor's exact type, dtype, shape, strides, device, requires_grad, and that its storage
 * holds every byte the job will touch. On any difference (or error) it touches nothing and returns None, and
 * the Python route (route.py) re-plans or declines the job, as it does without this binding.
 *
 * Built with kernel.c into one shared library when Python's headers are present (build.py); ctypes loads the
 * same file for lgc_centralize itself.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* Below this many entries the kernel runs with the GIL held: releasing it hands the interpreter to any thread
 * waiting for it (TensorBoard's event writer, a data loader's), and taking it back then costs more than the
 * kernel itself (tens of microseconds); above it, other threads may run while the kernel does. */
#define LGC_RELEASE_GIL_ENTRIES (1 << 20)

double lgc_centralize(int64_t jobs, const int64_t *grad, const int64_t *weight, const int64_t *rows,
                      const int64_t *cols, const int64_t *row_stride, const int32_t *dtype,
                      const double *coefficient, int64_t threads, int64_t min_per_thread, double *grad_sq);

static PyObject *s_weight_decay, *s_maximize, *s_decoupled_weight_decay, *s_params, *s_grad, *s_dtype, *s_shape, *s_requires_grad, *s_is_cpu, *s_stride, *s_storage_offset, *s_untyped_storage,
    *s_nbytes, *s_data_ptr, *s_detach;

/* The fields of a plan's expectations tuple (route.py, NativeRoute._expected), in order. */
enum {
  E_TENSOR_TYPE, /* torch.Tensor: gradients must be exactly this type */
  E_DTYPES,      /* per job: the dtype planned, or None (nothing planned: never matches) */
  E_SHAPES,      /* per job: torch.Size */
  E_STRIDES,     /* per job: tuple of ints */
  E_SPANS,       /* per job: bytes from the first entry to one past the last */
  E_ELEMENT_SIZES,
  E_WEIGHTS,     /* per job: the parameter whose values enter the mean (weight-decay compensation), or None */
  E_GRAD_TABLE,  /* addresses of the kernel's job tables (ctypes arrays the route owns) */
  E_WEIGHT_TABLE,
  E_ROWS,
  E_COLS,
  E_ROW_STRIDES,
  E_DTYPE_CODES,
  E_COEFFICIENTS,
  E_INCREMENT_VERSION, /* torch._C._increment_version: called on the gradients written */
  E_FIELDS
};

static int64_t as_int64(PyObject *value) {
  int64_t out = PyLong_AsLongLong(value);
  Py_DECREF(value);
  return out;
}

/* The address of `tensor`'s first entry if it is laid out exactly as job `j` was planned, else 0. */
static int64_t checked_address(PyObject *tensor, PyObject *expected, Py_ssize_t j) {
  PyObject *dtype = PyList_GET_ITEM(PyTuple_GET_ITEM(expected, E_DTYPES), j);
  if ((PyObject *)Py_TYPE(tensor) != PyTuple_GET_ITEM(expected, E_TENSOR_TYPE) || dtype == Py_None) return 0;
  PyObject *value = PyObject_GetAttr(tensor, s_dtype);
  int same = value == dtype;
  Py_XDECREF(value);
  if (!same) return 0;
  value = PyObject_GetAttr(tensor, s_requires_grad);
  same = value == Py_False; /* create_graph: the eager route keeps GC differentiable */
  Py_XDECREF(value);
  if (!same) return 0;
  value = PyObject_GetAttr(tensor, s_is_cpu);
  same = value == Py_True;
  Py_XDECREF(value);
  if (!same) return 0;
  value = PyObject_GetAttr(tensor, s_shape);
  same = value && PyObject_RichCompareBool(value, PyList_GET_ITEM(PyTuple_GET_ITEM(expected, E_SHAPES), j), Py_EQ) == 1;
  Py_XDECREF(value);
  if (!same) return 0;
  value = PyObject_CallMethodNoArgs(tensor, s_stride);
  same = value && PyObject_RichCompareBool(value, PyList_GET_ITEM(PyTuple_GET_ITEM(expected, E_STRIDES), j), Py_EQ) == 1;
  Py_XDECREF(value);
  if (!same) return 0;
  value = PyObject_CallMethodNoArgs(tensor, s_storage_offset);
  if (!value) return 0;
  int64_t first_byte = as_int64(value) * PyLong_AsLongLong(PyList_GET_ITEM(PyTuple_GET_ITEM(expected, E_ELEMENT_SIZES), j));
  PyObject *storage = PyObject_CallMethodNoArgs(tensor, s_untyped_storage);
  if (!storage) return 0;
  value = PyObject_CallMethodNoArgs(storage, s_nbytes);
  Py_DECREF(storage);
  if (!value) return 0;
  int64_t held = as_int64(value);
  int64_t span = PyLong_AsLongLong(PyList_GET_ITEM(PyTuple_GET_ITEM(expected, E_SPANS), j));
  if (PyErr_Occurred() || first_byte < 0 || first_byte + span > held) return 0;
  value = PyObject_CallMethodNoArgs(tensor, s_data_ptr);
  return value ? as_int64(value) : 0;
}

static int64_t *table(PyObject *expected, int field) {
  return (int64_t *)(intptr_t)PyLong_AsLongLong(PyTuple_GET_ITEM(expected, field));
}

/* Check every job's gradient, and if all are as planned, centralize them; return the result tuple or None. */
static PyObject *check_and_run(PyObject *grads, PyObject *expected, int64_t threads, int64_t min_per_thread,
                               int want_grad_sq) {
  Py_ssize_t jobs = PyList_GET_SIZE(grads);
  int64_t *grad = table(expected, E_GRAD_TABLE), *weight = table(expected, E_WEIGHT_TABLE);
  const int64_t *rows = table(expected, E_ROWS), *cols = table(expected, E_COLS);
  PyObject *weights = PyTuple_GET_ITEM(expected, E_WEIGHTS);
  Py_ssize_t live = 0;
  int64_t entries = 0;
  for (Py_ssize_t j = 0; j < jobs; ++j) {
    PyObject *g = PyList_GET_ITEM(grads, j);
    grad[j] = weight[j] = 0;
    if (g == Py_None) continue;
    int64_t address = checked_address(g, expected, j);
    PyObject *param = PyList_GET_ITEM(weights, j);
    if (address && param != Py_None) { /* the kernel reads the weight with the gradient's geometry */
      PyObject *w = PyObject_CallMethodNoArgs(param, s_detach);
      weight[j] = w ? checked_address(w, expected, j) : 0;
      Py_XDECREF(w);
      if (!weight[j]) address = 0;
    }
    if (!address) {
      PyErr_Clear(); /* whatever failed is the Python route's to explain, re-plan or decline */
      for (Py_ssize_t k = 0; k < jobs; ++k) grad[k] = weight[k] = 0;
      Py_RETURN_NONE;
    }
    grad[j] = address;
    entries += rows[j] * cols[j];
    ++live;
  }
  if (PyErr_Occurred()) return NULL;
  double removed_sq = 0.0, grad_sq = 0.0;
  const int64_t *row_stride = table(expected, E_ROW_STRIDES);
  const int32_t *dtype = (const int32_t *)table(expected, E_DTYPE_CODES);
  const double *coefficient = (const double *)table(expected, E_COEFFICIENTS);
  double *grad_sq_out = want_grad_sq ? &grad_sq : 0;
  if (live && entries >= LGC_RELEASE_GIL_ENTRIES) {
    Py_BEGIN_ALLOW_THREADS removed_sq = lgc_centralize(jobs, grad, weight, rows, cols, row_stride, dtype, coefficient,
                                                       threads, min_per_thread, grad_sq_out);
    Py_END_ALLOW_THREADS
  } else if (live) {
    removed_sq = lgc_centralize(jobs, grad, weight, rows, cols, row_stride, dtype, coefficient, threads, min_per_thread,
                                grad_sq_out);
  }
  for (Py_ssize_t j = 0; j < jobs; ++j) grad[j] = weight[j] = 0; /* no address outlives the call */
  if (live) { /* written behind autograd's back: say so, as in-place ops do (None entries are skipped) */
    PyObject *written = grads;
    if (live < jobs) {
      written = PyList_New(0);
      for (Py_ssize_t j = 0; written && j < jobs; ++j)
        if (PyList_GET_ITEM(grads, j) != Py_None && PyList_Append(written, PyList_GET_ITEM(grads, j)) < 0) Py_CLEAR(written);
      if (!written) return NULL;
    } else {
      Py_INCREF(written);
    }
    PyObject *done = PyObject_CallOneArg(PyTuple_GET_ITEM(expected, E_INCREMENT_VERSION), written);
    Py_DECREF(written);
    if (!done) return NULL;
    Py_DECREF(done);
  }
  return Py_BuildValue("(ddn)", removed_sq, grad_sq, live);
}

/* checked_centralize(items, expected, threads, min_per_thread, want_grad_sq, from_params)
 *   -> (removed_sq, grad_sq, live) | None
 * `items`: a list aligned with the jobs: their gradients (None: skip the job), or with `from_params` their
 * parameters, whose `.grad` is read here. None back: some gradient (or decay weight) is not as planned, and
 * nothing was written. */
static PyObject *checked_centralize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  if (nargs != 6 || !PyList_CheckExact(args[0]) || !PyTuple_CheckExact(args[1]) || PyTuple_GET_SIZE(args[1]) != E_FIELDS) {
    PyErr_SetString(PyExc_TypeError,
                    "checked_centralize(items: list, expected: tuple, threads, min_per_thread, want_grad_sq, from_params)");
    return NULL;
  }
  PyObject *items = args[0], *expected = args[1];
  Py_ssize_t jobs = PyList_GET_SIZE(items);
  if (PyList_GET_SIZE(PyTuple_GET_ITEM(expected, E_DTYPES)) != jobs) {
    PyErr_SetString(PyExc_ValueError, "checked_centralize: one gradient (or None) per planned job");
    return NULL;
  }
  int64_t threads = PyLong_AsLongLong(args[2]), min_per_thread = PyLong_AsLongLong(args[3]);
  int want_grad_sq = PyObject_IsTrue(args[4]), from_params = PyObject_IsTrue(args[5]);
  if (PyErr_Occurred()) return NULL;
  if (!from_params) return check_and_run(items, expected, threads, min_per_thread, want_grad_sq);
  PyObject *grads = PyList_New(jobs); /* holds each gradient for the duration of the call */
  for (Py_ssize_t j = 0; grads && j < jobs; ++j) {
    PyObject *g = PyObject_GetAttr(PyList_GET_ITEM(items, j), s_grad);
    if (!g) Py_CLEAR(grads);
    else PyList_SET_ITEM(grads, j, g);
  }
  if (!grads) return NULL;
  PyObject *result = check_and_run(grads, expected, threads, min_per_thread, want_grad_sq);
  Py_DECREF(grads);
  return result;
}

/* Whether `value` (a dict's entry, NULL when absent) equals `expected` (None standing for absent). */
static int same_entry(PyObject *value, PyObject *expected) {
  if (!value) return expected == Py_None;
  return value == expected || PyObject_RichCompareBool(value, expected, Py_EQ) == 1;
}

/* same_signature(param_groups, signature) -> bool
 * Whether plan_cache.plan_signature(optimizer) would equal `signature` now, read without building it: each
 * group's parameters are the same objects in the same order, with the same requires_grad and dtype, and the
 * same weight_decay, maximize and decoupled_weight_decay. Anything unexpected reads as "not the same". */
static PyObject *same_signature(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  if (nargs != 2 || !PyList_Check(args[0]) || !PyTuple_Check(args[1])) Py_RETURN_FALSE;
  PyObject *groups = args[0], *signature = args[1];
  Py_ssize_t count = PyList_GET_SIZE(groups);
  if (PyTuple_GET_SIZE(signature) != count) Py_RETURN_FALSE;
  PyObject *keys[] = {s_weight_decay, s_maximize, s_decoupled_weight_decay};
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject *group = PyList_GET_ITEM(groups, i), *expected = PyTuple_GET_ITEM(signature, i);
    if (!PyDict_Check(group) || !PyTuple_Check(expected) || PyTuple_GET_SIZE(expected) != 5) Py_RETURN_FALSE;
    PyObject *params = PyDict_GetItemWithError(group, s_params);
    PyObject *ids = PyTuple_GET_ITEM(expected, 0), *flags = PyTuple_GET_ITEM(expected, 1);
    if (!params || !PyList_Check(params) || !PyTuple_Check(ids) || !PyTuple_Check(flags)) goto different;
    Py_ssize_t n = PyList_GET_SIZE(params);
    if (PyTuple_GET_SIZE(ids) != n || PyTuple_GET_SIZE(flags) != n) goto different;
    for (Py_ssize_t k = 0; k < n; ++k) {
      PyObject *param = PyList_GET_ITEM(params, k), *flag = PyTuple_GET_ITEM(flags, k);
      if (PyLong_AsVoidPtr(PyTuple_GET_ITEM(ids, k)) != (void *)param) goto different;
      if (!PyTuple_Check(flag) || PyTuple_GET_SIZE(flag) != 2) goto different;
      PyObject *requires_grad = PyObject_GetAttr(param, s_requires_grad);
      int same = requires_grad == PyTuple_GET_ITEM(flag, 0);
      Py_XDECREF(requires_grad);
      PyObject *dtype = same ? PyObject_GetAttr(param, s_dtype) : NULL;
      same = same && dtype == PyTuple_GET_ITEM(flag, 1);
      Py_XDECREF(dtype);
      if (!same) goto different;
    }
    for (int key = 0; key < 3; ++key) {
      PyObject *value = PyDict_GetItemWithError(group, keys[key]); /* borrowed; NULL when absent */
      if (!same_entry(value, PyTuple_GET_ITEM(expected, 2 + key))) goto different;
    }
  }
  Py_RETURN_TRUE;
different:
  PyErr_Clear();
  Py_RETURN_FALSE;
}

static PyMethodDef methods[] = {
    {"same_signature", (PyCFunction)(void (*)(void))same_signature, METH_FASTCALL,
     "Whether an optimizer's param groups still have this plan signature."},
    {"checked_centralize", (PyCFunction)(void (*)(void))checked_centralize, METH_FASTCALL,
     "Check every gradient against its job's planned geometry; if all match, centralize them in one call."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lightning_gc_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__lightning_gc_native(void) {
  const char *names[] = {"weight_decay", "maximize", "decoupled_weight_decay", "params", "grad", "dtype", "shape", "requires_grad", "is_cpu", "stride", "storage_offset",
                         "untyped_storage", "nbytes", "data_ptr", "detach"};
  PyObject **slots[] = {&s_weight_decay, &s_maximize, &s_decoupled_weight_decay, &s_params, &s_grad, &s_dtype, &s_shape, &s_requires_grad, &s_is_cpu, &s_stride, &s_storage_offset,
                        &s_untyped_storage, &s_nbytes, &s_data_ptr, &s_detach};
  for (int i = 0; i < (int)(sizeof(slots) / sizeof(*slots)); ++i)
    if (!(*slots[i] = PyUnicode_InternFromString(names[i]))) return NULL;
  return PyModule_Create(&module);
}
