/* asynctrace._speedups: the native accelerator.
 *
 * The readable specification is asynctrace/_speedups_py.py: this module defines the same
 * names with the same behaviour, and tests/test_native.py runs the same tests against both.
 *
 * Tap: a loop's call_soon that runs asynctrace's completion markers the moment a task is done
 * (inside its last step: an exact end time, no Handle) and passes every other call, unchanged,
 * to the loop's own call_soon. A Tap written in Python adds a frame to every call_soon of the
 * loop and costs more than it saves; this one adds a type check.
 *
 * Multi-phase initialisation, per-module state and a heap type: the module can be loaded in
 * several (sub)interpreters, each with its own GIL, and declares it needs no GIL (3.13+).
 * A Tap never changes after it is made, so it needs no lock.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

typedef struct {
    PyTypeObject *tap_type;
    PyObject *mark_name; /* "mark" */
} speedups_state;

typedef struct {
    PyObject_HEAD
    PyObject *call_soon; /* the loop's own call_soon: every other call goes there */
    PyObject *markers;   /* tuple of types whose instances are run on the spot */
    PyObject *mark_name;
    vectorcallfunc vectorcall;
} TapObject;

static inline speedups_state *
get_state(PyObject *module)
{
    return (speedups_state *)PyModule_GetState(module);
}

static int
is_marker(TapObject *self, PyObject *callback)
{
    PyObject *type = (PyObject *)Py_TYPE(callback);
    Py_ssize_t n = PyTuple_GET_SIZE(self->markers);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyTuple_GET_ITEM(self->markers, i) == type) {
            return 1;
        }
    }
    return 0;
}

static PyObject *
tap_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    TapObject *self = (TapObject *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs == 2 && is_marker(self, args[0])) {
        PyObject *stack[2] = {args[0], args[1]};
        PyObject *done = PyObject_VectorcallMethod(self->mark_name, stack, 2, NULL);
        if (done == NULL) {
            /* Never into the task's last step: reported, then scheduled as usual. */
            PyErr_WriteUnraisable(args[0]);
        }
        else {
            int handled = (done == Py_True);
            Py_DECREF(done);
            if (handled) {
                Py_RETURN_NONE;
            }
        }
    }
    return PyObject_Vectorcall(self->call_soon, args, nargsf, kwnames);
}

static PyObject *
tap_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"call_soon", "markers", NULL};
    PyObject *call_soon, *markers;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:Tap", keywords, &call_soon, &markers)) {
        return NULL;
    }
    if (!PyCallable_Check(call_soon)) {
        PyErr_Format(PyExc_TypeError, "Tap: call_soon must be callable, got %R", call_soon);
        return NULL;
    }
    int ok = PyTuple_Check(markers);
    for (Py_ssize_t i = 0; ok && i < PyTuple_GET_SIZE(markers); i++) {
        ok = PyType_Check(PyTuple_GET_ITEM(markers, i));
    }
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "Tap: markers must be a tuple of types, got %R", markers);
        return NULL;
    }
    PyObject *module = PyType_GetModule(type);
    if (module == NULL) {
        return NULL;
    }
    TapObject *self = (TapObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->call_soon = Py_NewRef(call_soon);
    self->markers = Py_NewRef(markers);
    self->mark_name = Py_NewRef(get_state(module)->mark_name);
    self->vectorcall = tap_vectorcall;
    return (PyObject *)self;
}

static int
tap_traverse(PyObject *op, visitproc visit, void *arg)
{
    TapObject *self = (TapObject *)op;
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(self->call_soon);
    Py_VISIT(self->markers);
    return 0;
}

static int
tap_clear(PyObject *op)
{
    TapObject *self = (TapObject *)op;
    Py_CLEAR(self->call_soon);
    Py_CLEAR(self->markers);
    Py_CLEAR(self->mark_name);
    return 0;
}

static void
tap_dealloc(PyObject *op)
{
    PyTypeObject *type = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    (void)tap_clear(op);
    type->tp_free(op);
    Py_DECREF(type);
}

static PyObject *
tap_repr(PyObject *op)
{
    TapObject *self = (TapObject *)op;
    if (self->call_soon == NULL) {
        return PyUnicode_FromString("<asynctrace Tap (cleared)>");
    }
    return PyUnicode_FromFormat("<asynctrace Tap of %R>", self->call_soon);
}

static PyMemberDef tap_members[] = {
    {"call_soon", T_OBJECT, offsetof(TapObject, call_soon), READONLY,
     "The loop's own call_soon (a bound method), which gets every other call."},
    {"markers", T_OBJECT, offsetof(TapObject, markers), READONLY, "The marker types."},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(TapObject, vectorcall), READONLY},
    {NULL},
};

PyDoc_STRVAR(tap_doc,
"Tap(call_soon, markers)\n--\n\n"
"A loop's call_soon that runs completion markers on the spot (see _speedups_py.Tap).");

static PyType_Slot tap_slots[] = {
    {Py_tp_new, tap_new},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_traverse, tap_traverse},
    {Py_tp_clear, tap_clear},
    {Py_tp_dealloc, tap_dealloc},
    {Py_tp_repr, tap_repr},
    {Py_tp_members, tap_members},
    {Py_tp_doc, (void *)tap_doc},
    {0, NULL},
};

static PyType_Spec tap_spec = {
    .name = "asynctrace._speedups.Tap",
    .basicsize = sizeof(TapObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL
             | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = tap_slots,
};

static int
speedups_exec(PyObject *module)
{
    speedups_state *state = get_state(module);
    state->mark_name = PyUnicode_InternFromString("mark");
    if (state->mark_name == NULL) {
        return -1;
    }
    state->tap_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &tap_spec, NULL);
    if (state->tap_type == NULL) {
        return -1;
    }
    if (PyModule_AddType(module, state->tap_type) < 0) {
        return -1;
    }
    if (PyModule_AddStringConstant(module, "IMPLEMENTATION", "c") < 0) {
        return -1;
    }
    PyObject *all = Py_BuildValue("[ss]", "IMPLEMENTATION", "Tap");
    if (all == NULL || PyModule_AddObject(module, "__all__", all) < 0) {
        Py_XDECREF(all);
        return -1;
    }
    return 0;
}

static int
speedups_traverse(PyObject *module, visitproc visit, void *arg)
{
    speedups_state *state = get_state(module);
    Py_VISIT(state->tap_type);
    return 0;
}

static int
speedups_clear(PyObject *module)
{
    speedups_state *state = get_state(module);
    Py_CLEAR(state->tap_type);
    Py_CLEAR(state->mark_name);
    return 0;
}

static void
speedups_free(void *module)
{
    (void)speedups_clear((PyObject *)module);
}

static PyModuleDef_Slot speedups_slots[] = {
    {Py_mod_exec, speedups_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "asynctrace._speedups",
    .m_doc = "asynctrace's native accelerator (specification: asynctrace/_speedups_py.py).",
    .m_size = sizeof(speedups_state),
    .m_slots = speedups_slots,
    .m_traverse = speedups_traverse,
    .m_clear = speedups_clear,
    .m_free = speedups_free,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
