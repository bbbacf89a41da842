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
 * A Tap's call_soon and markers never change after it is made; its batched check's state
 * (see "The batched check" below) changes only on its loop's thread and only on builds with
 * a GIL (a free-threaded build has no check), so it needs no lock.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <time.h>

#define STATE_STRINGS(X) X(hooks) X(lean) X(started) X(value) X(operation_name) \
    X(correlation_id) X(priority_hint) X(name) X(context) X(eager_start) X(done)     \
    X(add_done_callback) X(cancelled) X(_exception) X(finished) X(begin) X(end) X(created_ns) \
    X(getrandbits) X(_common) X(_RUNTIME_CONTEXT) X(_tracer) X(span_processor)               \
    X(_span_processors) X(_checked_processors) X(trace_state) X(trace_flags)      \
    X(_closed) X(_count_unfinished) X(_runtime) X(_current_context) X(get_span_context)        \
    X(task_begin) X(task_end) X(span_id) X(is_remote) X(exemplars) X(_lanes) X(get_coro)       \
    X(__qualname__) X(get_name) X(add_task) X(call_soon) X(_callbacks) X(create_task)     \
    X(_task_factory) X(get_task_factory)

typedef struct {
    PyTypeObject *tap_type;
    PyTypeObject *lean_factory_type;
    PyTypeObject *counts_type;
    PyTypeObject *lean_done_type;
    PyTypeObject *span_hooks_type;
    PyTypeObject *span_ids_type;
    PyTypeObject *starts_type;
    PyTypeObject *lane_queue_type;
    PyTypeObject *thread_slot_type;
    PyTypeObject *span_record_type;
    PyTypeObject *create_task_type;
    PyObject *mark_name; /* "mark" */
#define DECLARE(n) PyObject *s_##n;
    STATE_STRINGS(DECLARE)
#undef DECLARE
    PyObject *kw_loop_context;      /* ("loop", "context") */
    PyObject *kw_loop_context_name; /* ("loop", "context", "name") */
    PyObject *kw_eager;             /* ("loop", "context", "eager_start") */
    PyObject *kw_metadata;          /* ("operation_name", "correlation_id", "priority_hint") */
    PyObject *kw_eager_name;        /* ("loop", "context", "name", "eager_start") */
    PyObject *kw_context;           /* ("context",) */
} speedups_state;

typedef struct {
    PyObject_HEAD
    PyObject *call_soon; /* the loop's own call_soon: every other call goes there */
    PyObject *markers;   /* tuple of types whose instances are run on the spot */
    PyObject *mark_name;
    PyTypeObject *lean_done_type; /* the module's LeanDone (borrowed: the module holds it) */
    vectorcallfunc vectorcall;
    /* The batched check (see tap_check below): NULL kept means none on this loop. */
    PyObject *kept;      /* code objects and functions of done callbacks never removed */
    PyObject *done;      /* the LeanDone of the tasks batched last (NULL before any) */
    PyObject *task_type; /* their type (asyncio.Task): ends of its noted tasks are marked */
    PyObject *step_type; /* the type of a C task's scheduled step, once seen */
    PyObject *step;      /* the step the pending check stands for */
    PyObject *check;     /* the check, bound to this tap (made once) */
    PyObject **batch;    /* (task, context) pairs made while a check is pending (owned) */
    Py_ssize_t batch_len, batch_cap; /* in pairs */
    int expect;  /* EXPECT_MAKING, then EXPECT_STEP_SEEN (see tap_vectorcall) */
    int pending; /* a check is scheduled (and has not run yet) */
    int layout;  /* the future's callback fields: 0 not probed yet, 1 read, -1 not readable */
    long long handed_ns; /* when this loop's thread last handed the GIL over (see courtesy) */
} TapObject;

#define EXPECT_MAKING 1    /* Tap.expect: a LeanFactory is making a task */
#define EXPECT_STEP_SEEN 2 /* Tap.expect: and the tap saw its first step */

static int tap_mark_task(TapObject *self, PyObject *task);
static PyObject *tap_schedule_check(TapObject *self, PyObject *step, PyObject *context);
typedef struct LeanDoneObject LeanDoneObject;
static int ld_record(LeanDoneObject *self, PyObject *task, PyObject *entry, PyObject *given,
                     long long created_ns, long long finished_ns);
static int tap_is_step(TapObject *self, PyObject *callback);
/* SpanHooks' begin and end, which the factory and LeanDone call with C times when their hooks
   are these (see sh_begin_ns, sh_end_ns). */
static PyObject *sh_begin(PyObject *op, PyObject *const *args, Py_ssize_t nargs);
static PyObject *sh_end(PyObject *op, PyObject *const *args, Py_ssize_t nargs);
static PyObject *sh_begin_ns(PyObject *op, PyObject *metadata, long long created_ns,
                             PyObject *created);
static PyObject *sh_end_ns(PyObject *op, PyObject *task, PyObject *entry, PyObject *metadata,
                           PyObject *outcome, long long finished_ns, PyObject *finished);

/* The SpanHooks that `hook` is `method` of, bound (borrowed), or NULL. */
static inline PyObject *
span_hooks_of(PyObject *hook, PyObject *(*method)(PyObject *, PyObject *const *, Py_ssize_t))
{
    if (PyCFunction_Check(hook)
        && PyCFunction_GET_FUNCTION(hook) == (PyCFunction)(void (*)(void))method) {
        return PyCFunction_GET_SELF(hook);
    }
    return NULL;
}

/* tp_dealloc of this module's collected heap types: untrack, clear, free, release the type. */
static void
gc_heap_dealloc(PyObject *op, inquiry clear)
{
    PyTypeObject *type = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    (void)clear(op);
    type->tp_free(op);
    Py_DECREF(type);
}

/* ---------------------------------------------------------------------------------------
 * Slots: reading asynctrace's own objects without an attribute lookup. What is read at every
 * task (the State's hooks, its Hooks table's fields, a TaskMetadata's) lives in __slots__. A
 * Slots names such a type and where those slots are, found once, when the reader is made,
 * from the type's member descriptors; an object of exactly that type then has them read at
 * their offsets, always live (a slot set later is seen). Any other object (a test's stand-in,
 * a subclass), a slot not set, or a free-threaded build (where a slot may be replaced while it
 * is read) takes the attribute lookup, as before.
 * --------------------------------------------------------------------------------------- */
#define SLOTS_MAX 3
typedef struct {
    PyObject *type; /* the type probed, or NULL: every read looks up */
    Py_ssize_t offset[SLOTS_MAX];
    int probed;     /* slots_probe_first: done (whatever it found) */
} Slots;

static void
slots_probe(Slots *slots, PyObject *type, const char *const *names, int n)
{
    slots->type = NULL;
#ifndef Py_GIL_DISABLED
    if (type == NULL || !PyType_Check(type)) {
        return;
    }
    for (int i = 0; i < n && i < SLOTS_MAX; i++) {
        PyObject *descr = PyObject_GetAttrString(type, names[i]);
        if (descr == NULL) {
            PyErr_Clear();
            return;
        }
        int ok = Py_IS_TYPE(descr, &PyMemberDescr_Type)
                 && ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX;
        if (ok) {
            slots->offset[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
        }
        Py_DECREF(descr);
        if (!ok) {
            return;
        }
    }
    slots->type = Py_NewRef(type);
#endif
}

/* The type of the first object read, probed as above, once (a reader made before it knows the
   type: the metadata's); never on a free-threaded build, where readers are shared unlocked. */
static void
slots_probe_first(Slots *slots, PyObject *obj, const char *const *names, int n)
{
#ifndef Py_GIL_DISABLED
    if (!slots->probed) {
        slots->probed = 1;
        slots_probe(slots, (PyObject *)Py_TYPE(obj), names, n);
    }
#endif
}

/* The type of obj.name, probed as above; nothing when it cannot be read (no error left). */
static void
slots_probe_attr(Slots *slots, PyObject *obj, PyObject *name, const char *const *names, int n)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL) {
        PyErr_Clear();
        slots->type = NULL;
        return;
    }
    slots_probe(slots, (PyObject *)Py_TYPE(value), names, n);
    Py_DECREF(value);
}

/* obj's slot i (new reference), else obj.name looked up. */
static inline PyObject *
slots_get(const Slots *slots, PyObject *obj, int i, PyObject *name)
{
    if ((PyObject *)Py_TYPE(obj) == slots->type) {
        PyObject *value = *(PyObject **)((char *)obj + slots->offset[i]);
        if (value != NULL) {
            return Py_NewRef(value);
        }
    }
    return PyObject_GetAttr(obj, name);
}

/* module.name (new reference): read from the module's dict (a module attribute is its entry
   there), else looked up (a module's __getattr__, or not a module). */
static PyObject *
module_attr(PyObject *module, PyObject *name)
{
    if (PyModule_CheckExact(module)) {
        PyObject *value = PyDict_GetItemWithError(PyModule_GetDict(module), name);
        if (value != NULL) {
            return Py_NewRef(value);
        }
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    return PyObject_GetAttr(module, name);
}

static const char *const STATE_SLOTS[1] = {"hooks"};
static const char *const METADATA_SLOTS[3] = {"operation_name", "correlation_id",
                                              "priority_hint"};
enum { MD_OPERATION, MD_CORRELATION, MD_PRIORITY };

static inline speedups_state *
get_state(PyObject *module)
{
    return (speedups_state *)PyModule_GetState(module);
}

static PyObject *ld_mark(PyObject *op, PyObject *task);

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

/* The GIL handed over to an export thread (see _speedups_py.exporting and export/lane.py).
 *
 * A loop thread that is never idle gives the GIL up at each select() and takes it back a
 * microsecond later, before a waiting thread has even woken: an export thread that wants it
 * back after each of a request's socket calls is woken hundreds of times for nothing, and
 * both threads pay for each wake-up (20-60 ms of CPU a request). While an export thread is
 * at work, a loop thread's tap therefore lets the GIL go for COURTESY_SPIN_NS at a task's
 * end, after its end time is taken, once a period has passed since the last: 0.5 ms, or a
 * 64th of the time the export thread has been at work if that is longer (a request takes a
 * few milliseconds; one that waits for a slow or absent collector, retries included, costs
 * the loop less and less). It spins, on a clock and the CPU's pause hint: a sleep (20 us
 * asked, 50-80 us taken with Linux's timer slack) idled the loop's CPU, and the traced tree
 * workload came back from it slower (a VM's idle vCPU wakes to cold caches). Only where
 * there is a GIL, and only with GCC or Clang off Windows (not built or measured there). */
static long long perf_counter_ns(void);
#define COURTESY_PERIOD_NS 500000LL
#define COURTESY_SPIN_NS 20000LL
#if !defined(Py_GIL_DISABLED) && !defined(_WIN32) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_COURTESY 1
#include <pthread.h>
static int exporting_threads;       /* export threads at work; read and written atomically */
static long long exporting_since_ns; /* since when (perf_counter_ns); atomically too */

/* A forked child has none of its parent's threads: none of them is at work there. */
static void
courtesy_after_fork_in_child(void)
{
    __atomic_store_n(&exporting_threads, 0, __ATOMIC_RELAXED);
}

static int
courtesy_watch_forks(void)
{
    static int watching; /* once a process: module execs (interpreters) share the count */
    if (__atomic_exchange_n(&watching, 1, __ATOMIC_RELAXED)) {
        return 0;
    }
    return pthread_atfork(NULL, NULL, courtesy_after_fork_in_child) == 0 ? 0 : -1;
}

static void
courtesy(TapObject *self)
{
    if (__atomic_load_n(&exporting_threads, __ATOMIC_RELAXED) <= 0) {
        return;
    }
    long long now = perf_counter_ns();
    long long period = (now - __atomic_load_n(&exporting_since_ns, __ATOMIC_RELAXED)) / 64;
    if (now - self->handed_ns < (period > COURTESY_PERIOD_NS ? period : COURTESY_PERIOD_NS)) {
        return;
    }
    Py_BEGIN_ALLOW_THREADS
    struct timespec t;
    (void)clock_gettime(CLOCK_MONOTONIC, &t);
    long long until = t.tv_sec * 1000000000LL + t.tv_nsec + COURTESY_SPIN_NS;
    do {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        __asm__ __volatile__("yield");
#endif
        (void)clock_gettime(CLOCK_MONOTONIC, &t);
    } while (t.tv_sec * 1000000000LL + t.tv_nsec < until);
    Py_END_ALLOW_THREADS
    self->handed_ns = perf_counter_ns();
}
#else
#define HAVE_COURTESY 0
static int
courtesy_watch_forks(void)
{
    return 0;
}

static void
courtesy(TapObject *self)
{
    (void)self;
}
#endif

static PyObject *
speedups_exporting(PyObject *module, PyObject *arg)
{
    (void)module;
    long change = PyLong_CheckExact(arg) ? PyLong_AsLong(arg) : 0;
    if (change == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        change = 0;
    }
    if (change != 1 && change != -1) {
        PyErr_Format(PyExc_ValueError,
                     "exporting: the change must be 1 (a thread starts its work) or -1 (it "
                     "ends it), got %R",
                     arg);
        return NULL;
    }
#if HAVE_COURTESY
    if (change == 1) {
        /* the first at work sets the time: one more at work meanwhile does not restart it */
        long long since = perf_counter_ns();
        int now = __atomic_add_fetch(&exporting_threads, 1, __ATOMIC_RELAXED);
        if (now == 1) {
            __atomic_store_n(&exporting_since_ns, since, __ATOMIC_RELAXED);
        }
        return PyLong_FromLong(now);
    }
    return PyLong_FromLong(__atomic_sub_fetch(&exporting_threads, 1, __ATOMIC_RELAXED));
#else
    Py_RETURN_NONE;
#endif
}

static PyObject *
tap_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    TapObject *self = (TapObject *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs == 2 && is_marker(self, args[0])) {
        PyObject *stack[2] = {args[0], args[1]};
        PyObject *done = Py_IS_TYPE(args[0], self->lean_done_type)
                             ? ld_mark(args[0], args[1]) /* its mark, with no lookup */
                             : PyObject_VectorcallMethod(self->mark_name, stack, 2, NULL);
        if (done == NULL) {
            /* Never into the task's last step: reported, then scheduled as usual. */
            PyErr_WriteUnraisable(args[0]);
        }
        else {
            int handled = (done == Py_True);
            Py_DECREF(done);
            if (handled) {
                courtesy(self); /* after the end is marked: its time is taken */
                Py_RETURN_NONE;
            }
        }
    }
    else if (nargs == 2 && self->done != NULL
             && Py_IS_TYPE(args[1], (PyTypeObject *)self->task_type)
             && tap_mark_task(self, args[1]) < 0) {
        PyErr_WriteUnraisable(args[0]);  /* a callback of a task that ended: marked first */
    }
    else if (self->expect == EXPECT_MAKING && nargs == 1 && kwnames != NULL
             && PyTuple_GET_SIZE(kwnames) == 1 && PyContext_CheckExact(args[1])
             && tap_is_step(self, args[0])) {
        /* The first step of a task the factory is making (see tap_check). */
        self->expect = EXPECT_STEP_SEEN;
        if (!self->pending) {
            return tap_schedule_check(self, args[0], args[1]);
        }
    }
    courtesy(self); /* after a task's end is marked (above) */
    return PyObject_Vectorcall(self->call_soon, args, nargsf, kwnames);
}

static PyObject *
tap_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"call_soon", "markers", "kept", NULL};
    PyObject *call_soon, *markers, *kept = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$O:Tap", keywords, &call_soon, &markers,
                                     &kept)) {
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
    if (kept != Py_None && !PyTuple_Check(kept)) {
        PyErr_Format(PyExc_TypeError, "Tap: kept must be a tuple or None, got %R", kept);
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
    self->lean_done_type = get_state(module)->lean_done_type;
    self->vectorcall = tap_vectorcall;
#ifndef Py_GIL_DISABLED
    /* Not on a free-threaded build: there the factory adds its callback to every task. */
    self->kept = kept == Py_None ? NULL : Py_NewRef(kept);
#endif
    return (PyObject *)self;
}

static int
tap_traverse(PyObject *op, visitproc visit, void *arg)
{
    TapObject *self = (TapObject *)op;
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(self->call_soon);
    Py_VISIT(self->markers);
    Py_VISIT(self->kept);
    Py_VISIT(self->done);
    Py_VISIT(self->task_type);
    Py_VISIT(self->step_type);
    Py_VISIT(self->step);
    Py_VISIT(self->check);
    for (Py_ssize_t i = 0; i < 2 * self->batch_len; i++) {
        Py_VISIT(self->batch[i]);
    }
    return 0;
}

/* Drop the batch (its references released); the array's memory stays for the next. */
static void
tap_drop_batch(TapObject *self)
{
    while (self->batch_len > 0) {
        self->batch_len--;
        Py_CLEAR(self->batch[2 * self->batch_len + 1]);
        Py_CLEAR(self->batch[2 * self->batch_len]);
    }
}

static int
tap_clear(PyObject *op)
{
    TapObject *self = (TapObject *)op;
    Py_CLEAR(self->call_soon);
    Py_CLEAR(self->markers);
    Py_CLEAR(self->mark_name);
    Py_CLEAR(self->kept);
    Py_CLEAR(self->done);
    Py_CLEAR(self->task_type);
    Py_CLEAR(self->step_type);
    Py_CLEAR(self->step);
    Py_CLEAR(self->check);
    tap_drop_batch(self);
    PyMem_Free(self->batch);
    self->batch = NULL;
    self->batch_cap = 0;
    return 0;
}

static void
tap_dealloc(PyObject *op)
{
    gc_heap_dealloc(op, tap_clear);
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
    {"kept", T_OBJECT, offsetof(TapObject, kept), READONLY,
     "The done callbacks never removed (code objects, functions), or None: no batched check."},
    {"done", T_OBJECT, offsetof(TapObject, done), READONLY,
     "The LeanDone of the tasks batched last, or None."},
    {"pending", T_INT, offsetof(TapObject, pending), READONLY,
     "Whether a batched check is scheduled."},
    {"layout", T_INT, offsetof(TapObject, layout), READONLY,
     "How the check reads a task's callbacks: 0 not yet, 1 the C Future's fields, -1 "
     "task._callbacks."},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(TapObject, vectorcall), READONLY},
    {NULL},
};

PyDoc_STRVAR(tap_doc,
"Tap(call_soon, markers, *, kept=None)\n--\n\n"
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


/* ---------------------------------------------------------------------------------------
 * LeanFactory: the task factory's common path (see _speedups_py.LeanFactory, and the
 * closure in _factory.make_factory that it takes over from): metadata in the new task's
 * context, the span sink's task_begin run in it (hooks.begin), the lean instruments'
 * task_started, the creation time (or begin's entry) noted, one shared done callback.
 * Anything off that path (records, a chained factory, an explicit context, eager start, a
 * helper call naming the task) is handed, untouched, to the Python factory.
 * --------------------------------------------------------------------------------------- */

#if PY_VERSION_HEX < 0x030C0000
static PyObject *
PyErr_GetRaisedException(void)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) {
        (void)PyException_SetTraceback(value, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}
#endif

#if PY_VERSION_HEX < 0x030D0000
static int
PyDict_Pop(PyObject *dict, PyObject *key, PyObject **result)
{
    PyObject *value = PyDict_GetItemWithError(dict, key);
    *result = NULL;
    if (value == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    *result = Py_NewRef(value);
    if (PyDict_DelItem(dict, key) < 0) {
        Py_CLEAR(*result);
        return -1;
    }
    return 1;
}

#define Py_BEGIN_CRITICAL_SECTION(op) {
#define PyObject_GetOptionalAttr _PyObject_LookupAttr
#define Py_END_CRITICAL_SECTION() }
#endif

/* call_each's rule for a lean hook that raised (exc, stolen): on_error(hook, exc) counts and
   logs it, or raises again what must not be swallowed (KeyboardInterrupt, SystemExit). 0 when
   it was counted, -1 with the error set when on_error raised. */
static int
hook_failed_with(PyObject *on_error, PyObject *hook, PyObject *exc)
{
    PyObject *res = PyObject_CallFunctionObjArgs(on_error, hook, exc, NULL);
    Py_DECREF(exc);
    if (res == NULL) {
        return -1;
    }
    Py_DECREF(res);
    return 0;
}

/* The same for the error being raised now. */
static int
hook_failed(PyObject *on_error, PyObject *hook)
{
    return hook_failed_with(on_error, hook, PyErr_GetRaisedException());
}

/* The C asyncio Task (exactly: not a subclass), of a size whose pointers may be scanned. */
static int
is_c_task_type(PyTypeObject *type)
{
    return strcmp(type->tp_name, "_asyncio.Task") == 0 &&
           type->tp_basicsize <= 64 * (Py_ssize_t)sizeof(PyObject *);
}

/* ---------------------------------------------------------------------------------------
 * ThreadSlot: a value per thread, None till set (see _speedups_py.ThreadSlot): what the
 * create_task helper hands the factory while it calls loop.create_task. The factory reads it
 * for every task, nearly always None: the slot counts the threads whose value is set, and a
 * read where none is costs no lookup (a threading.local's costs two). Kept in the thread
 * state's dict (per thread and interpreter), keyed by the slot.
 * --------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Py_ssize_t filled; /* threads whose value is set (a thread that ends with one keeps it) */
} ThreadSlotObject;

static Py_ssize_t
ts_filled(ThreadSlotObject *self)
{
    Py_ssize_t filled;
    Py_BEGIN_CRITICAL_SECTION(self);
    filled = self->filled;
    Py_END_CRITICAL_SECTION();
    return filled;
}

static void
ts_count(ThreadSlotObject *self, Py_ssize_t change)
{
    Py_BEGIN_CRITICAL_SECTION(self);
    self->filled += change;
    Py_END_CRITICAL_SECTION();
}

/* This thread's value (new reference), None when unset. */
static PyObject *
ts_value(PyObject *op)
{
    if (ts_filled((ThreadSlotObject *)op) == 0) {
        Py_RETURN_NONE;
    }
    PyObject *dict = PyThreadState_GetDict();
    PyObject *value = dict ? PyDict_GetItemWithError(dict, op) : NULL;
    if (value == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    return Py_NewRef(value);
}

static PyObject *
ts_get_value(PyObject *op, void *Py_UNUSED(closure))
{
    return ts_value(op);
}

static int
ts_set_value(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    ThreadSlotObject *self = (ThreadSlotObject *)op;
    PyObject *dict = PyThreadState_GetDict();
    if (dict == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ThreadSlot: this thread has no thread state");
        return -1;
    }
    int had = PyDict_Contains(dict, op);
    if (had < 0) {
        return -1;
    }
    if (value == NULL || value == Py_None) { /* None, or deleted: unset */
        if (had) {
            if (PyDict_DelItem(dict, op) < 0) {
                return -1;
            }
            ts_count(self, -1);
        }
        return 0;
    }
    if (PyDict_SetItem(dict, op, value) < 0) {
        return -1;
    }
    if (!had) {
        ts_count(self, 1);
    }
    return 0;
}

static PyObject *
ts_get_filled(PyObject *op, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(ts_filled((ThreadSlotObject *)op));
}

static PyObject *
ts_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if ((args != NULL && PyTuple_GET_SIZE(args) != 0)
        || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "ThreadSlot() takes no arguments");
        return NULL;
    }
    return type->tp_alloc(type, 0);
}

static void
ts_dealloc(PyObject *op)
{
    PyTypeObject *type = Py_TYPE(op);
    type->tp_free(op);
    Py_DECREF(type);
}

static PyGetSetDef ts_getset[] = {
    {"value", ts_get_value, ts_set_value, "This thread's value; None till set.", NULL},
    {"filled", ts_get_filled, NULL, "How many threads have a value set.", NULL},
    {NULL},
};

PyDoc_STRVAR(ts_doc,
"ThreadSlot()\n--\n\n"
"A value per thread, None till set (see _speedups_py.ThreadSlot).");

static PyType_Slot ts_slots[] = {
    {Py_tp_new, ts_new},
    {Py_tp_dealloc, ts_dealloc},
    {Py_tp_getset, ts_getset},
    {Py_tp_doc, (void *)ts_doc},
    {0, NULL},
};

static PyType_Spec ts_spec = {
    .name = "asynctrace._speedups.ThreadSlot",
    .basicsize = sizeof(ThreadSlotObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = ts_slots,
};


/* ---------------------------------------------------------------------------------------
 * Starts: the lean path's table, id(task) -> what was noted at the task's creation (see
 * _speedups_py.LeanDone, whose dict it stands for): its creation time (perf_counter_ns), or
 * an instrument's entry (a traced task's span handle). An open-addressing table of
 * (task address, value) pairs: a time is kept as a tagged integer, not an int object, and
 * no int object is made for the key, so a pending task costs the table one 16-byte slot
 * (at a load between 3/8 and 3/4). Linear probing; deletion shifts the run back (no
 * tombstones), and the table shrinks when mostly empty, so its size follows the tasks
 * pending, not the tasks ever made, down to STARTS_KEEP slots (64 KiB) once it has grown
 * past them: a program that makes tasks in batches (requests) does not grow and shrink the
 * table, rehashing and zeroing it, at every batch. Read from Python as a mapping (get, pop,
 * clear, [], in, len); sys.getsizeof() counts its slots.
 * --------------------------------------------------------------------------------------- */

typedef struct {
    uintptr_t key;   /* the task's address; 0: empty */
    uintptr_t value; /* (time << 1) | 1, or an object (a new reference; aligned, low bit 0) */
} StartsSlot;

typedef struct {
    PyObject_HEAD
    StartsSlot *slots;
    size_t mask; /* capacity - 1 (a power of two) */
    size_t used;
} StartsObject;

#define STARTS_MIN 8
#define STARTS_KEEP 4096 /* slots it shrinks no further than: 64 KiB */
#define STARTS_TAGGED(v) ((v) & 1)
#define STARTS_TIME_MAX ((long long)(((unsigned long long)1 << 62) - 1))

static size_t
starts_home(StartsObject *self, uintptr_t key)
{
    unsigned long long h = (unsigned long long)(key >> 4) * 0x9E3779B97F4A7C15ULL;
    return (size_t)(h ^ (h >> 32)) & self->mask;
}

/* The slot holding key, or NULL. */
static StartsSlot *
starts_find(StartsObject *self, uintptr_t key)
{
    if (self->slots == NULL) {
        return NULL;
    }
    for (size_t i = starts_home(self, key);; i = (i + 1) & self->mask) {
        StartsSlot *slot = &self->slots[i];
        if (slot->key == key) {
            return slot;
        }
        if (slot->key == 0) {
            return NULL;
        }
    }
}

static int
starts_resize(StartsObject *self, size_t capacity)
{
    StartsSlot *slots = PyMem_Calloc(capacity, sizeof(StartsSlot));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    StartsSlot *old = self->slots;
    size_t old_capacity = old ? self->mask + 1 : 0;
    self->slots = slots;
    self->mask = capacity - 1;
    for (size_t j = 0; j < old_capacity; j++) {
        if (old[j].key != 0) {
            size_t i = starts_home(self, old[j].key);
            while (slots[i].key != 0) {
                i = (i + 1) & self->mask;
            }
            slots[i] = old[j];
        }
    }
    PyMem_Free(old);
    return 0;
}

/* Note value (a tagged time, or an object reference the table takes) for key; replaces
   any. The caller holds the table's critical section (see starts_store). */
static int
starts_put(StartsObject *self, uintptr_t key, uintptr_t value)
{
    size_t capacity = self->slots ? self->mask + 1 : 0;
    if ((self->used + 1) * 4 > capacity * 3 &&
        starts_resize(self, capacity ? capacity * 2 : STARTS_MIN) < 0) {
        return -1;
    }
    size_t i = starts_home(self, key);
    while (self->slots[i].key != 0 && self->slots[i].key != key) {
        i = (i + 1) & self->mask;
    }
    StartsSlot *slot = &self->slots[i];
    uintptr_t old = slot->key == key ? slot->value : 1;
    if (slot->key == 0) {
        self->used++;
    }
    slot->key = key;
    slot->value = value;
    if (!STARTS_TAGGED(old)) {
        Py_DECREF((PyObject *)old);
    }
    return 0;
}

static uintptr_t
starts_time(long long created_ns)
{
    return ((uintptr_t)created_ns << 1) | 1;
}

/* Remove the slot, shifting back the run after it; its value is the caller's. */
static void
starts_remove(StartsObject *self, StartsSlot *slot)
{
    size_t hole = (size_t)(slot - self->slots);
    for (size_t i = (hole + 1) & self->mask; self->slots[i].key != 0; i = (i + 1) & self->mask) {
        size_t home = starts_home(self, self->slots[i].key);
        /* the entry at i may fill the hole when its home is not in (hole, i] (cyclically) */
        if (((i - home) & self->mask) >= ((i - hole) & self->mask)) {
            self->slots[hole] = self->slots[i];
            hole = i;
        }
    }
    self->slots[hole].key = 0;
    self->slots[hole].value = 0;
    self->used--;
    if (self->mask + 1 > STARTS_KEEP && self->used * 8 < self->mask + 1) {
        (void)starts_resize(self, (self->mask + 1) / 2); /* on no memory, stays as it is */
        PyErr_Clear();
    }
}

/* Pop key: 1 with *value (a new reference, or the time with *created_ns), 0 if absent. */
static int
starts_pop(StartsObject *self, uintptr_t key, PyObject **value, long long *created_ns)
{
    int found = 0;
    Py_BEGIN_CRITICAL_SECTION(self);
    StartsSlot *slot = starts_find(self, key);
    if (slot != NULL) {
        uintptr_t v = slot->value;
        starts_remove(self, slot);
        if (STARTS_TAGGED(v)) {
            *value = NULL;
            *created_ns = (long long)(v >> 1);
        }
        else {
            *value = (PyObject *)v; /* the table's reference, now the caller's */
        }
        found = 1;
    }
    Py_END_CRITICAL_SECTION();
    return found;
}

/* Note value for key under the table's critical section; an object reference given is the
   table's, or released here when the table cannot take it. */
static int
starts_store(StartsObject *self, uintptr_t key, uintptr_t value)
{
    int rc;
    Py_BEGIN_CRITICAL_SECTION(self);
    rc = starts_put(self, key, value);
    Py_END_CRITICAL_SECTION();
    if (rc < 0 && !STARTS_TAGGED(value)) {
        Py_DECREF((PyObject *)value);
    }
    return rc;
}

static int
starts_note(StartsObject *self, PyObject *task, PyObject *entry, long long created_ns)
{
    uintptr_t value;
    if (entry != NULL && entry != Py_None) {
        value = (uintptr_t)Py_NewRef(entry);
    }
    else if (created_ns >= 0 && created_ns <= STARTS_TIME_MAX) {
        value = starts_time(created_ns);
    }
    else { /* out of the tagged range: kept as an int object */
        PyObject *created = PyLong_FromLongLong(created_ns);
        if (created == NULL) {
            return -1;
        }
        value = (uintptr_t)created;
    }
    return starts_store(self, (uintptr_t)task, value);
}

/* A Python key (an int: id(task)) as an address; 0 with an error naming it otherwise. */
static uintptr_t
starts_key(PyObject *key)
{
    if (!PyLong_Check(key)) {
        PyErr_Format(PyExc_TypeError, "Starts: a key is a task's id (an int), got %R", key);
        return 0;
    }
    unsigned long long k = PyLong_AsUnsignedLongLong(key);
    if ((k == (unsigned long long)-1 && PyErr_Occurred()) || k == 0 || k > UINTPTR_MAX) {
        PyErr_Clear();
        PyErr_SetObject(PyExc_KeyError, key);
        return 0;
    }
    return (uintptr_t)k;
}

static PyObject *
starts_value_object(uintptr_t v)
{
    return STARTS_TAGGED(v) ? PyLong_FromLongLong((long long)(v >> 1))
                            : Py_NewRef((PyObject *)v);
}

static PyObject *
starts_lookup(StartsObject *self, PyObject *key, PyObject *missing)
{
    uintptr_t k = starts_key(key);
    if (k == 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError)) {
            return NULL;
        }
        PyErr_Clear();
    }
    PyObject *result = NULL;
    Py_BEGIN_CRITICAL_SECTION(self);
    StartsSlot *slot = k ? starts_find(self, k) : NULL;
    result = slot ? starts_value_object(slot->value) : NULL;
    Py_END_CRITICAL_SECTION();
    if (result == NULL && !PyErr_Occurred()) {
        if (missing == NULL) {
            PyErr_SetObject(PyExc_KeyError, key);
            return NULL;
        }
        return Py_NewRef(missing);
    }
    return result;
}

static PyObject *
starts_subscript(PyObject *op, PyObject *key)
{
    return starts_lookup((StartsObject *)op, key, NULL);
}

static int
starts_ass_subscript(PyObject *op, PyObject *key, PyObject *value)
{
    StartsObject *self = (StartsObject *)op;
    uintptr_t k = starts_key(key);
    if (k == 0) {
        if (value != NULL && PyErr_ExceptionMatches(PyExc_KeyError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "Starts: a key is a task's id, got %R", key);
        }
        return -1;
    }
    if (value == NULL) {
        PyObject *old = NULL;
        long long created;
        if (starts_pop(self, k, &old, &created) == 0) {
            PyErr_SetObject(PyExc_KeyError, key);
            return -1;
        }
        Py_XDECREF(old);
        return 0;
    }
    if (PyLong_CheckExact(value)) {
        long long created = PyLong_AsLongLong(value);
        if (created >= 0 && created <= STARTS_TIME_MAX) {
            return starts_store(self, k, starts_time(created));
        }
        PyErr_Clear(); /* out of the tagged range: kept as the object */
    }
    return starts_store(self, k, (uintptr_t)Py_NewRef(value));
}

static Py_ssize_t
starts_length(PyObject *op)
{
    return (Py_ssize_t)((StartsObject *)op)->used;
}

static int
starts_contains(PyObject *op, PyObject *key)
{
    StartsObject *self = (StartsObject *)op;
    uintptr_t k = starts_key(key);
    if (k == 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError)) {
            return -1;
        }
        PyErr_Clear();
        return 0;
    }
    int present;
    Py_BEGIN_CRITICAL_SECTION(self);
    present = starts_find(self, k) != NULL;
    Py_END_CRITICAL_SECTION();
    return present;
}

static PyObject *
starts_get(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "Starts.get takes 1 or 2 arguments (%zd given)", nargs);
        return NULL;
    }
    return starts_lookup((StartsObject *)op, args[0], nargs == 2 ? args[1] : Py_None);
}

static PyObject *
starts_pop_method(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "Starts.pop takes 1 or 2 arguments (%zd given)", nargs);
        return NULL;
    }
    uintptr_t k = starts_key(args[0]);
    if (k == 0 && !PyErr_ExceptionMatches(PyExc_KeyError)) {
        return NULL;
    }
    PyErr_Clear();
    PyObject *value = NULL;
    long long created = 0;
    if (k == 0 || starts_pop((StartsObject *)op, k, &value, &created) == 0) {
        if (nargs == 2) {
            return Py_NewRef(args[1]);
        }
        PyErr_SetObject(PyExc_KeyError, args[0]);
        return NULL;
    }
    return value != NULL ? value : PyLong_FromLongLong(created);
}

/* Empty the table, leaving it valid (no slots: made again by the next note), and release
   what it held afterwards: releasing an entry can run code (a weakref callback) that reads
   the table. */
static void
starts_drop_all(StartsObject *self)
{
    StartsSlot *old;
    size_t capacity;
    Py_BEGIN_CRITICAL_SECTION(self);
    old = self->slots;
    capacity = old ? self->mask + 1 : 0;
    self->slots = NULL;
    self->used = 0;
    self->mask = 0;
    Py_END_CRITICAL_SECTION();
    for (size_t i = 0; i < capacity; i++) {
        if (old[i].key != 0 && !STARTS_TAGGED(old[i].value)) {
            Py_DECREF((PyObject *)old[i].value);
        }
    }
    PyMem_Free(old);
}

static PyObject *
starts_clear_method(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    starts_drop_all((StartsObject *)op);
    Py_RETURN_NONE;
}

static PyObject *
starts_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Starts() takes no arguments");
        return NULL;
    }
    return type->tp_alloc(type, 0); /* empty: the slots are made by the first note */
}

static int
starts_traverse(PyObject *op, visitproc visit, void *arg)
{
    StartsObject *self = (StartsObject *)op;
    Py_VISIT(Py_TYPE(op));
    for (size_t i = 0; self->slots != NULL && i <= self->mask; i++) {
        if (self->slots[i].key != 0 && !STARTS_TAGGED(self->slots[i].value)) {
            Py_VISIT((PyObject *)self->slots[i].value);
        }
    }
    return 0;
}

static int
starts_tp_clear(PyObject *op)
{
    starts_drop_all((StartsObject *)op);
    return 0;
}

static void
starts_dealloc(PyObject *op)
{
    gc_heap_dealloc(op, starts_tp_clear);
}

static PyObject *
starts_repr(PyObject *op)
{
    return PyUnicode_FromFormat("<Starts: %zu pending>", ((StartsObject *)op)->used);
}

static PyObject *
starts_sizeof(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    StartsObject *self = (StartsObject *)op;
    size_t size = (size_t)Py_TYPE(op)->tp_basicsize;
    Py_BEGIN_CRITICAL_SECTION(op);
    size += self->slots ? (self->mask + 1) * sizeof(StartsSlot) : 0;
    Py_END_CRITICAL_SECTION();
    return PyLong_FromSize_t(size);
}

static PyMethodDef starts_methods[] = {
    {"__sizeof__", starts_sizeof, METH_NOARGS, "The table's size in bytes, its slots counted."},
    {"get", (PyCFunction)(void (*)(void))starts_get, METH_FASTCALL,
     "get(task_id, default=None): what was noted for the task, else default."},
    {"pop", (PyCFunction)(void (*)(void))starts_pop_method, METH_FASTCALL,
     "pop(task_id[, default]): remove and return what was noted for the task."},
    {"clear", starts_clear_method, METH_NOARGS, "clear(): forget every task."},
    {NULL},
};

PyDoc_STRVAR(starts_doc,
"Starts()\n--\n\n"
"The lean path's table: id(task) -> its creation time (perf_counter_ns) or an\n"
"instrument's entry (see _speedups_py.LeanDone.starts, a dict there).");

static PyType_Slot starts_slots[] = {
    {Py_tp_new, starts_new},
    {Py_tp_traverse, starts_traverse},
    {Py_tp_clear, starts_tp_clear},
    {Py_tp_dealloc, starts_dealloc},
    {Py_tp_repr, starts_repr},
    {Py_tp_methods, starts_methods},
    {Py_tp_doc, (void *)starts_doc},
    {Py_mp_length, starts_length},
    {Py_mp_subscript, starts_subscript},
    {Py_mp_ass_subscript, starts_ass_subscript},
    {Py_sq_contains, starts_contains},
    {0, NULL},
};

static PyType_Spec starts_spec = {
    .name = "asynctrace._speedups.Starts",
    .basicsize = sizeof(StartsObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = starts_slots,
};

/* SpanIds: the span handle's ids and creation time as native integers (the base of the sink's
   _TaskSpan; see _speedups_py.SpanIds), not one int object each per task; and its weak
   reference list, here rather than a __weakref__ slot of the subclass (which 3.12+ keeps in a
   two-pointer header before the object: 8 bytes more). The handle's object fields are here
   too (SPAN_IDS_FIELDS), so the sink's class adds no slot: a subclass that adds none of a
   base without the collector's support is made without it as well, and a handle has no
   16-byte GC header (the handle refers to nothing that refers back to it; see
   sh_new_handle). */
#define SPAN_IDS_FIELDS(X) X(_context) X(_rare) X(correlation_id) X(inherited) X(parent)
typedef struct {
    PyObject_HEAD
    unsigned long long trace_high, trace_low, span_id;
    long long created_ns;
    PyObject *weakreflist;
#define SI_DECLARE(n) PyObject *n;
    SPAN_IDS_FIELDS(SI_DECLARE)
#undef SI_DECLARE
} SpanIdsObject;

#define IDS(obj) ((SpanIdsObject *)(obj))

typedef struct {
    PyObject_HEAD
    PyObject *fallback;       /* the Python factory: every call off the common path */
    PyObject *state;          /* asynctrace._state.STATE */
    PyObject *slot;           /* the helper's thread-local slot (_create_task.PENDING) */
    PyObject *cid_var;
    PyObject *metadata_var;
    PyObject *make_metadata;  /* _metadata._make_metadata */
    PyObject *metadata_type;  /* TaskMetadata when given: made here as make_metadata does */
    PyObject *meta_op, *meta_cid, *meta_prio;  /* its slots' member descriptors */
    PyObject *new_cid;        /* _factory.new_correlation_id */
    PyObject *validate;       /* _metadata.validate_metadata */
    PyObject *task_type;      /* asyncio.Task */
    PyObject *lean_done;      /* the shared done callback */
    PyObject *starts;         /* the Starts table: id(task) -> creation time (ns) or entry */
    PyObject *on_error;       /* called with (hook, exception) when a started hook raises */
    PyObject *lean_finish;    /* for an eager task done in its first step */
    PyObject *eager_type;     /* task_type is partial(T, eager_start=True) of a type T: T */
    PyObject *plain_task;     /* the C _asyncio.Task once seen built not done, or NULL */
    PyObject *last;           /* (correlation id, metadata) last made, or NULL */
    PyObject *named;          /* (operation, id, priority, metadata) last made, or NULL */
    PyObject *validated;      /* a set: operation names found valid (str), at most
                                 LF_VALIDATED_MAX, then cleared */
    PyObject *derived_from;   /* the creator's variables (a HAMT) when last derived, or NULL */
    PyObject *derived;        /* that context with the task's variables set (see lf_reuse) */
    PyObject *derived_cid;    /* the correlation id set in it, or NULL */
    PyObject *derived_meta;   /* the metadata set in it, or NULL */
    PyObject *dict;
    Slots state_slots; /* STATE.hooks */
    Slots hooks_slots; /* its lean, begin, started */
    Slots meta_slots;  /* metadata_type's (see METADATA_SLOTS) */
    vectorcallfunc vectorcall;
} LeanFactoryObject;

static const char *const LF_HOOKS_SLOTS[3] = {"lean", "begin", "started"};
enum { LF_LEAN, LF_BEGIN, LF_STARTED };

#define LF_VALIDATED_MAX 256

static TapObject *lf_batching_tap(LeanFactoryObject *self, PyObject *loop, speedups_state *st);
static int tap_batch_add(TapObject *self, PyObject *task, PyObject *context);

static long long
perf_counter_ns(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyTime_t t;
    (void)PyTime_PerfCounterRaw(&t);
    return (long long)t;
#else
    return (long long)_PyTime_GetPerfCounter();
#endif
}

static PyObject *
lf_fallback(LeanFactoryObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

/* The member descriptors of metadata_type's operation_name, correlation_id and priority_hint
   slots (new references into fields); 0 with none when metadata_type is NULL or None, -1 with
   a TypeError when it is not a type with those three slots. */
static int
lf_metadata_fields(PyObject *metadata_type, PyObject *fields[3])
{
    if (metadata_type == NULL || metadata_type == Py_None) {
        return 0;
    }
    static const char *names[3] = {"operation_name", "correlation_id", "priority_hint"};
    for (int i = 0; PyType_Check(metadata_type) && i < 3; i++) {
        fields[i] = PyObject_GetAttrString(metadata_type, names[i]);
        if (fields[i] == NULL) {
            PyErr_Clear();
            break;
        }
        if (!Py_IS_TYPE(fields[i], &PyMemberDescr_Type)) {
            break;
        }
        if (i == 2) {
            return 0;
        }
    }
    for (int i = 0; i < 3; i++) {
        Py_CLEAR(fields[i]);
    }
    PyErr_Format(PyExc_TypeError, "LeanFactory: metadata_type must be a class with "
                 "operation_name, correlation_id and priority_hint slots, got %R", metadata_type);
    return -1;
}

/* A new metadata object: make_metadata(op, cid, prio), or the same made here from
   metadata_type (object.__new__, then the three slots set through their descriptors). */
static PyObject *
lf_make_metadata(LeanFactoryObject *self, PyObject *op, PyObject *cid, PyObject *prio)
{
    if (self->metadata_type == NULL || self->metadata_type == Py_None) {
        return PyObject_CallFunctionObjArgs(self->make_metadata, op, cid, prio, NULL);
    }
    PyObject *empty = PyTuple_New(0);
    if (empty == NULL) {
        return NULL;
    }
    PyObject *made = PyBaseObject_Type.tp_new((PyTypeObject *)self->metadata_type, empty, NULL);
    Py_DECREF(empty);
    if (made == NULL) {
        return NULL;
    }
    PyObject *fields[3] = {self->meta_op, self->meta_cid, self->meta_prio};
    PyObject *values[3] = {op, cid, prio};
    int atomic = 1;
    for (int i = 0; i < 3; i++) {
        if (Py_TYPE(fields[i])->tp_descr_set(fields[i], made, values[i]) < 0) {
            Py_DECREF(made);
            return NULL;
        }
        atomic &= values[i] == Py_None || PyUnicode_CheckExact(values[i])
                  || PyLong_CheckExact(values[i]);
    }
    /* Frozen, and holding only str, int or None: in no cycle, so the collector need not
       walk it (as CPython untracks a tuple of such values); one per named task. */
    if (atomic && PyObject_GC_IsTracked(made)) {
        PyObject_GC_UnTrack(made);
    }
    return made;
}

/* The metadata of a task with these fields (new reference); caches the last one made. */
static PyObject *
lf_metadata(LeanFactoryObject *self, PyObject *op, PyObject *cid, PyObject *prio)
{
    PyObject *cached = NULL;
    int unnamed = (op == Py_None && prio == Py_None);
    Py_BEGIN_CRITICAL_SECTION(self);
    PyObject *entry = unnamed ? self->last : self->named;
    if (entry != NULL) {
        if (unnamed && cid != Py_None && PyTuple_GET_ITEM(entry, 0) == cid) {
            cached = Py_NewRef(PyTuple_GET_ITEM(entry, 1));
        }
        else if (!unnamed && PyTuple_GET_ITEM(entry, 0) == op && PyTuple_GET_ITEM(entry, 1) == cid
                 && PyTuple_GET_ITEM(entry, 2) == prio) {
            cached = Py_NewRef(PyTuple_GET_ITEM(entry, 3));
        }
    }
    Py_END_CRITICAL_SECTION();
    if (cached != NULL) {
        return cached;
    }
    PyObject *made = lf_make_metadata(self, op, cid, prio);
    if (made == NULL) {
        return NULL;
    }
    PyObject *fresh = unnamed ? PyTuple_Pack(2, cid, made) : PyTuple_Pack(4, op, cid, prio, made);
    if (fresh == NULL) {
        Py_DECREF(made);
        return NULL;
    }
    PyObject *old;
    Py_BEGIN_CRITICAL_SECTION(self);
    if (unnamed) {
        old = self->last;
        self->last = fresh;
    }
    else {
        old = self->named;
        self->named = fresh;
    }
    Py_END_CRITICAL_SECTION();
    Py_XDECREF(old);
    return made;
}

/* Sibling tasks share their variables. A task's context is a copy of its creator's with the
   correlation id and metadata set: two writes, so a new HAMT (and node) per task, which the
   cycle collector walks while the task is pending. Tasks that one step of their creator makes
   with the same id and metadata would all get equal HAMTs: the first is kept (`derived`) and
   the next ones' contexts are copies of it, which share its HAMT (a HAMT never changes; a
   task that sets a variable gets a new one, in its own context only). That holds while the
   creator's variables are exactly what they were: the same HAMT (identity, not equality:
   a value replaced by an equal one must still be seen). The HAMT is in CPython's private
   PyContext (Include/internal/pycore_context.h), the same fields from 3.11 to 3.14; read
   only to compare two pointers, on those versions with the GIL, and never on others. The
   kept `derived_from` holds a reference to the creator's HAMT, so its address cannot be
   reused by another. */
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030F0000 && !defined(Py_GIL_DISABLED)
#define SHARED_VARIABLES 1
typedef struct {
    PyObject_HEAD
    PyObject *ctx_prev;
    PyObject *ctx_vars;
} ContextFields;
#define CONTEXT_VARS(ctx) (((ContextFields *)(ctx))->ctx_vars)
#else
#define CONTEXT_VARS(ctx) NULL
#define SHARED_VARIABLES 0
#endif

/* 1 with *ctx replaced by a copy of the kept derived context (see above), 0 when it does
   not apply, -1 on error. cid and metadata are what is to be set (NULL: not set). */
static int
lf_reuse(LeanFactoryObject *self, PyObject **ctx, PyObject *cid, PyObject *metadata)
{
#if SHARED_VARIABLES
    if (self->derived == NULL || self->derived_cid != cid || self->derived_meta != metadata
        || self->derived_from != CONTEXT_VARS(*ctx)) {
        return 0;
    }
    PyObject *copy = PyContext_Copy(self->derived);
    if (copy == NULL) {
        return -1;
    }
    Py_SETREF(*ctx, copy);
    return 1;
#else
    (void)self, (void)ctx, (void)cid, (void)metadata;
    return 0;
#endif
}

/* Keep from (the creator's variables, a new reference: stolen) and ctx with cid and
   metadata set. */
static int
lf_keep(LeanFactoryObject *self, PyObject *from, PyObject *ctx, PyObject *cid,
        PyObject *metadata)
{
    PyObject *derived = PyContext_Copy(ctx);
    if (derived == NULL) {
        Py_DECREF(from);
        return -1;
    }
    Py_XSETREF(self->derived_from, from);
    Py_XSETREF(self->derived, derived);
    Py_XSETREF(self->derived_cid, Py_XNewRef(cid));
    Py_XSETREF(self->derived_meta, Py_XNewRef(metadata));
    return 0;
}

/* Whether the metadata in the creator's context already says what the task's would. */
static int
lf_inherits(LeanFactoryObject *self, PyObject *metadata, PyObject *cid, speedups_state *st)
{
    const Slots *md = &self->meta_slots;
    PyObject *value = slots_get(md, metadata, MD_OPERATION, st->s_operation_name);
    if (value == NULL) {
        return -1;
    }
    int ok = (value == Py_None);
    Py_DECREF(value);
    if (ok) {
        value = slots_get(md, metadata, MD_PRIORITY, st->s_priority_hint);
        if (value == NULL) {
            return -1;
        }
        ok = (value == Py_None);
        Py_DECREF(value);
    }
    if (ok) {
        value = slots_get(md, metadata, MD_CORRELATION, st->s_correlation_id);
        if (value == NULL) {
            return -1;
        }
        ok = PyObject_RichCompareBool(value, cid, Py_EQ);
        Py_DECREF(value);
    }
    return ok;
}

static int
lf_call_started(LeanFactoryObject *self, PyObject *hooks, PyObject *metadata, speedups_state *st)
{
    PyObject *started = slots_get(&self->hooks_slots, hooks, LF_STARTED, st->s_started);
    if (started == NULL) {
        return -1;
    }
    if (!PyTuple_Check(started)) {
        Py_DECREF(started);
        PyErr_SetString(PyExc_TypeError, "hooks.started must be a tuple");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(started); i++) {
        PyObject *hook = PyTuple_GET_ITEM(started, i);
        PyObject *res = PyObject_CallOneArg(hook, metadata);
        if (res != NULL) {
            Py_DECREF(res);
            continue;
        }
        if (hook_failed(self->on_error, hook) < 0) {
            Py_DECREF(started);
            return -1;
        }
    }
    Py_DECREF(started);
    return 0;
}

/* hooks.begin(metadata, created_ns) inside the task's context (see _speedups_py.LeanFactory):
   a new reference to what it returned, Py_None when there is no hook, it returned None or
   raised (counted by on_error); NULL when on_error re-raised. */
static PyObject *
lf_begin(LeanFactoryObject *self, PyObject *hooks, PyObject *ctx, PyObject *metadata,
         long long created_ns, speedups_state *st)
{
    PyObject *begin = slots_get(&self->hooks_slots, hooks, LF_BEGIN, st->s_begin);
    if (begin == NULL) {
        return NULL;
    }
    if (begin == Py_None) {
        return begin;
    }
    PyObject *span_hooks = span_hooks_of(begin, sh_begin);
    PyObject *created = span_hooks ? NULL : PyLong_FromLongLong(created_ns);
    if ((span_hooks == NULL && created == NULL) || PyContext_Enter(ctx) < 0) {
        Py_XDECREF(created);
        Py_DECREF(begin);
        return NULL;
    }
    PyObject *call_args[2] = {metadata, created};
    PyObject *entry = span_hooks ? sh_begin_ns(span_hooks, metadata, created_ns, NULL)
                                 : PyObject_Vectorcall(begin, call_args, 2, NULL);
    PyObject *exc = entry == NULL ? PyErr_GetRaisedException() : NULL;
    Py_XDECREF(created);
    if (PyContext_Exit(ctx) < 0) {
        Py_XDECREF(exc);
        Py_XDECREF(entry);
        Py_DECREF(begin);
        return NULL;
    }
    if (exc != NULL) {  /* call_each's rule, as for the started hooks */
        int counted = hook_failed_with(self->on_error, begin, exc);
        Py_DECREF(begin);
        return counted < 0 ? NULL : Py_NewRef(Py_None);
    }
    Py_DECREF(begin);
    return entry;
}

enum { KW_UNKNOWN, KW_CONTEXT, KW_EAGER_START, KW_NAME, KW_OPERATION_NAME,
       KW_CORRELATION_ID, KW_PRIORITY_HINT };

/* Which of the factory's keywords key is (KW_UNKNOWN: none), -1 on error. Keyword names
   written in code are interned, so they are found by identity; others by comparison. */
static int
lf_keyword(PyObject *key, speedups_state *st)
{
    PyObject *names[6] = {st->s_context, st->s_eager_start, st->s_name, st->s_operation_name,
                          st->s_correlation_id, st->s_priority_hint};
    for (int i = 0; i < 6; i++) {
        if (key == names[i]) {
            return i + 1;
        }
    }
    for (int i = 0; i < 6; i++) {
        int eq = PyUnicode_Compare(key, names[i]);
        if (eq == 0) {
            return i + 1;
        }
        if (eq == -1 && PyErr_Occurred()) {
            return -1;
        }
    }
    return KW_UNKNOWN;
}

static PyObject *
lf_vectorcall(PyObject *op_self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    LeanFactoryObject *self = (LeanFactoryObject *)op_self;
    speedups_state *st = PyType_GetModuleState(Py_TYPE(op_self));
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (st == NULL || nargs != 2) {
        return lf_fallback(self, args, nargsf, kwnames);
    }
    PyObject *loop = args[0], *coro = args[1];
    PyObject *op = Py_None, *cid = Py_None, *prio = Py_None, *name = Py_None;
    int metadata_keywords = 0;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (kwnames == st->kw_metadata) {  /* CreateTask's call: the three, in this order */
        op = args[2], cid = args[3], prio = args[4];
        metadata_keywords = 1;
        nkw = 0;
    }
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *value = args[nargs + i];
        int which = lf_keyword(PyTuple_GET_ITEM(kwnames, i), st);
        if (which < 0) {
            return NULL;
        }
        switch (which) {
        case KW_CONTEXT:
        case KW_EAGER_START:
            if (value != Py_None) {
                return lf_fallback(self, args, nargsf, kwnames);  /* explicit context, eager */
            }
            break;
        case KW_NAME:
            name = value;
            break;
        case KW_OPERATION_NAME:
            op = value;
            metadata_keywords = 1;
            break;
        case KW_CORRELATION_ID:
            cid = value;
            metadata_keywords = 1;
            break;
        case KW_PRIORITY_HINT:
            prio = value;
            metadata_keywords = 1;
            break;
        default:
            return lf_fallback(self, args, nargsf, kwnames);  /* unknown: it raises */
        }
    }
    PyObject *hooks = slots_get(&self->state_slots, self->state, 0, st->s_hooks);
    if (hooks == NULL) {
        return NULL;
    }
    PyObject *lean = slots_get(&self->hooks_slots, hooks, LF_LEAN, st->s_lean);
    if (lean == NULL) {
        Py_DECREF(hooks);
        return NULL;
    }
    int is_lean = (lean == Py_True);
    Py_DECREF(lean);
    PyObject *pending = !is_lean ? Py_NewRef(Py_None)
                      : Py_IS_TYPE(self->slot, st->thread_slot_type) ? ts_value(self->slot)
                      : PyObject_GetAttr(self->slot, st->s_value);
    if (pending == NULL) {
        Py_DECREF(hooks);
        return NULL;
    }
    if (!is_lean || (pending != Py_None
                     && (metadata_keywords || !PyTuple_CheckExact(pending)
                         || PyTuple_GET_SIZE(pending) != 5
                         || PyTuple_GET_ITEM(pending, 3) != Py_None
                         || PyTuple_GET_ITEM(pending, 4) != Py_None))) {
        Py_DECREF(hooks);
        Py_DECREF(pending);
        return lf_fallback(self, args, nargsf, kwnames);
    }
    if (pending != Py_None) {
        if (PyObject_SetAttr(self->slot, st->s_value, Py_None) < 0) { /* rare: a Python call */
            goto fail_early;
        }
        op = PyTuple_GET_ITEM(pending, 0);
        cid = PyTuple_GET_ITEM(pending, 1);
        prio = PyTuple_GET_ITEM(pending, 2);
    }
    else if (metadata_keywords) {
        /* Operation names found valid before (a str never changes), nothing else: valid. */
        int known = (cid == Py_None && prio == Py_None);
        if (known && op != Py_None) {
            known = PyUnicode_CheckExact(op) ? PySet_Contains(self->validated, op) : 0;
            if (known < 0) {
                goto fail_early;
            }
        }
        if (!known) {
            PyObject *ok = PyObject_CallFunctionObjArgs(self->validate, op, cid, prio, NULL);
            if (ok == NULL) {  /* the Python factory raises it again, and closes the coroutine */
                PyErr_Clear();
                Py_DECREF(hooks);
                Py_DECREF(pending);
                return lf_fallback(self, args, nargsf, kwnames);
            }
            Py_DECREF(ok);
            if (PyUnicode_CheckExact(op)) {
                if ((PySet_GET_SIZE(self->validated) >= LF_VALIDATED_MAX
                     && PySet_Clear(self->validated) < 0)
                    || PySet_Add(self->validated, op) < 0) {
                    goto fail_early;
                }
            }
        }
    }

    PyObject *ctx = NULL, *inherited = NULL, *metadata = NULL, *task = NULL, *result = NULL;
    PyObject *own_cid = NULL, *entry = NULL;
    TapObject *tap = NULL;
    ctx = PyContext_CopyCurrent();
    if (ctx == NULL || PyContextVar_Get(self->cid_var, NULL, &inherited) < 0) {
        goto done;
    }
    int set_cid = 0;
    if (cid == Py_None) {
        if (inherited != NULL) {
            cid = inherited;
        }
        else {
            own_cid = PyObject_CallNoArgs(self->new_cid);
            if (own_cid == NULL) {
                goto done;
            }
            cid = own_cid;
            set_cid = (cid != Py_None);
        }
    }
    else if (inherited == NULL) {
        set_cid = 1;
    }
    else {
        int same = PyObject_RichCompareBool(cid, inherited, Py_EQ);
        if (same < 0) {
            goto done;
        }
        set_cid = !same;
    }
    int inherit = 0;
    if (op == Py_None && prio == Py_None) {
        if (PyContextVar_Get(self->metadata_var, NULL, &metadata) < 0) {
            goto done;
        }
        if (metadata != NULL && metadata != Py_None) {
            inherit = lf_inherits(self, metadata, cid, st);
            if (inherit < 0) {
                goto done;
            }
        }
        if (!inherit) {
            Py_CLEAR(metadata);
        }
    }
    if (!inherit) {
        metadata = lf_metadata(self, op, cid, prio);
        if (metadata == NULL) {
            goto done;
        }
    }
    PyObject *set_id = set_cid ? cid : NULL, *set_meta = inherit ? NULL : metadata;
    int reused = (set_id || set_meta) ? lf_reuse(self, &ctx, set_id, set_meta) : 1;
    if (reused < 0) {
        goto done;
    }
    if (!reused) {
        PyObject *from = SHARED_VARIABLES ? Py_NewRef(CONTEXT_VARS(ctx)) : NULL;
        if (PyContext_Enter(ctx) < 0) {
            Py_XDECREF(from);
            goto done;
        }
        PyObject *token = NULL;
        int failed = 0;
        if (set_id) {
            token = PyContextVar_Set(self->cid_var, cid);
            failed = (token == NULL);
            Py_XDECREF(token);
        }
        if (!failed && set_meta) {
            token = PyContextVar_Set(self->metadata_var, metadata);
            failed = (token == NULL);
            Py_XDECREF(token);
        }
        if (PyContext_Exit(ctx) < 0 || failed) {
            Py_XDECREF(from);
            goto done;
        }
        if (from != NULL && lf_keep(self, from, ctx, set_id, set_meta) < 0) {
            goto done;
        }
    }

    long long created_ns = perf_counter_ns();
    entry = lf_begin(self, hooks, ctx, metadata, created_ns, st);
    if (entry == NULL) {
        goto done;
    }
    /* The loop's tap sees the task's first step (EXPECT_STEP_SEEN) when it can be batched.
       An eager task's first step runs in Task(): a check is scheduled before it instead. */
    tap = lf_batching_tap(self, loop, st);
    int eager = !PyType_Check(self->task_type);
    int saved_expect = tap != NULL ? tap->expect : 0;
    if (tap != NULL && eager && !tap->pending) {
        PyObject *handle = tap_schedule_check(tap, NULL, ctx);
        if (handle == NULL) {
            goto done;
        }
        Py_DECREF(handle);
    }
    if (tap != NULL) {
        tap->expect = eager ? EXPECT_STEP_SEEN : EXPECT_MAKING;
    }
    PyObject *call_args[5] = {NULL, coro, loop, ctx, Py_True};
    if (name != Py_None) {
        PyObject *with_name[6] = {NULL, coro, loop, ctx, name, Py_True};
        task = self->eager_type
            ? PyObject_Vectorcall(self->eager_type, with_name + 1,
                                  1 | PY_VECTORCALL_ARGUMENTS_OFFSET, st->kw_eager_name)
            : PyObject_Vectorcall(self->task_type, with_name + 1,
                                  1 | PY_VECTORCALL_ARGUMENTS_OFFSET, st->kw_loop_context_name);
    }
    else {
        task = self->eager_type
            ? PyObject_Vectorcall(self->eager_type, call_args + 1,
                                  1 | PY_VECTORCALL_ARGUMENTS_OFFSET, st->kw_eager)
            : PyObject_Vectorcall(self->task_type, call_args + 1,
                                  1 | PY_VECTORCALL_ARGUMENTS_OFFSET, st->kw_loop_context);
    }
    int batch = 0;
    if (tap != NULL) {
        batch = (tap->expect == EXPECT_STEP_SEEN);
        tap->expect = saved_expect;
    }
    if (task == NULL) {
        goto done;
    }
    if (lf_call_started(self, hooks, metadata, st) < 0) {
        goto done;
    }
    /* Only an eager task can be done here: a C task built without eager_start has run nothing
       yet (asked of the first one, then known by its type; other types are always asked). */
    int finished = 0;
    if (eager || (PyObject *)Py_TYPE(task) != self->plain_task) {
        PyObject *is_done = PyObject_CallMethodNoArgs(task, st->s_done);
        if (is_done == NULL) {
            goto done;
        }
        finished = (is_done == Py_True);
        Py_DECREF(is_done);
#ifndef Py_GIL_DISABLED
        if (!eager && !finished && self->plain_task == NULL && is_c_task_type(Py_TYPE(task))) {
            self->plain_task = Py_NewRef((PyObject *)Py_TYPE(task));
        }
#endif
    }
    if (finished && Py_IS_TYPE(self->lean_done, st->lean_done_type)) {
        /* an eager task that finished in its first step: what lean_finish does, in C */
        if (ld_record((LeanDoneObject *)self->lean_done, task, entry == Py_None ? NULL : entry,
                      metadata, created_ns, perf_counter_ns()) < 0) {
            goto done;
        }
    }
    else if (finished) {  /* the same, through the Python lean_finish */
        PyObject *duration = PyLong_FromLongLong(perf_counter_ns() - created_ns);
        PyObject *r = duration == NULL ? NULL : PyObject_CallFunctionObjArgs(
            self->lean_finish, task, metadata, duration, entry, NULL);
        Py_XDECREF(duration);
        if (r == NULL) {
            goto done;
        }
        Py_DECREF(r);
    }
    else {
        if (starts_note((StartsObject *)self->starts, task, entry, created_ns) < 0) {
            goto done;
        }
        batch = batch ? tap_batch_add(tap, task, ctx) : 0;
        if (batch < 0) {
            goto done;
        }
    }
    if (!finished && !batch) {
        PyObject *cb_args[3] = {task, self->lean_done, ctx};
        PyObject *r = PyObject_VectorcallMethod(st->s_add_done_callback, cb_args,
                                                2 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                                st->kw_context);
        if (r == NULL) {
            goto done;
        }
        Py_DECREF(r);
    }
    result = Py_NewRef(task);
done:
    Py_XDECREF(tap);
    Py_XDECREF(task);
    Py_XDECREF(entry);
    Py_XDECREF(metadata);
    Py_XDECREF(inherited);
    Py_XDECREF(own_cid);
    Py_XDECREF(ctx);
    Py_DECREF(hooks);
    Py_DECREF(pending);
    return result;
fail_early:
    Py_DECREF(hooks);
    Py_DECREF(pending);
    return NULL;
}

/* T when task_type is functools.partial(T, eager_start=True) of a type T (what the factory
   chains for asyncio's eager_task_factory), else NULL: T is then called with eager_start
   among its keywords, not through the partial (which copies its keywords into a dict). */
static PyObject *
lf_eager_type(PyObject *task_type)
{
    if (PyType_Check(task_type)) {
        return NULL;
    }
    PyObject *func = PyObject_GetAttrString(task_type, "func");
    PyObject *args = func ? PyObject_GetAttrString(task_type, "args") : NULL;
    PyObject *keywords = args ? PyObject_GetAttrString(task_type, "keywords") : NULL;
    PyObject *flag = keywords && PyDict_CheckExact(keywords) && PyDict_GET_SIZE(keywords) == 1
                         ? PyDict_GetItemString(keywords, "eager_start") : NULL;
    int ok = flag == Py_True && PyType_Check(func) && PyTuple_CheckExact(args)
             && PyTuple_GET_SIZE(args) == 0;
    Py_XDECREF(args);
    Py_XDECREF(keywords);
    PyErr_Clear(); /* not such a partial: called as it is */
    if (!ok) {
        Py_XDECREF(func);
        return NULL;
    }
    return func;
}

static PyObject *
lf_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {
        "fallback", "state", "slot", "cid_var", "metadata_var", "make_metadata", "new_cid",
        "validate", "task_type", "lean_done", "starts", "on_error", "lean_finish", NULL};
    PyObject *a[13];
    /* metadata_type (optional) is taken out before the others are parsed */
    PyObject *metadata_type = NULL, *rest = kwargs == NULL ? NULL : PyDict_Copy(kwargs);
    if (kwargs != NULL && rest == NULL) {
        return NULL;
    }
    metadata_type = rest == NULL ? NULL : PyDict_GetItemString(rest, "metadata_type");
    if (metadata_type != NULL) {
        Py_INCREF(metadata_type);
        if (PyDict_DelItemString(rest, "metadata_type") < 0) {
            Py_DECREF(metadata_type);
            Py_DECREF(rest);
            return NULL;
        }
    }
    int parsed = PyArg_ParseTupleAndKeywords(args, rest, "$OOOOOOOOOOOOO:LeanFactory", keywords,
                                             &a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6],
                                             &a[7], &a[8], &a[9], &a[10], &a[11], &a[12]);
    Py_XDECREF(rest);
    PyObject *meta_fields[3] = {NULL, NULL, NULL};
    if (parsed && lf_metadata_fields(metadata_type, meta_fields) < 0) {
        parsed = 0;
    }
    if (!parsed) {
        Py_XDECREF(metadata_type);
        return NULL;
    }
    if (!PyContextVar_CheckExact(a[3]) || !PyContextVar_CheckExact(a[4])) {
        PyErr_Format(PyExc_TypeError, "LeanFactory: cid_var and metadata_var must be "
                     "ContextVars, got %R and %R", a[3], a[4]);
        goto fail_fields;
    }
    speedups_state *st = PyType_GetModuleState(type);
    if (!Py_IS_TYPE(a[10], st->starts_type)) {
        PyErr_Format(PyExc_TypeError,
                     "LeanFactory: starts must be a Starts table (a LeanDone's), got %R", a[10]);
        goto fail_fields;
    }
    LeanFactoryObject *self = (LeanFactoryObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        goto fail_fields;
    }
    self->metadata_type = metadata_type;  /* the references move to self */
    self->meta_op = meta_fields[0];
    self->meta_cid = meta_fields[1];
    self->meta_prio = meta_fields[2];
    PyObject **fields[13] = {&self->fallback, &self->state, &self->slot, &self->cid_var,
        &self->metadata_var, &self->make_metadata, &self->new_cid, &self->validate,
        &self->task_type, &self->lean_done, &self->starts, &self->on_error, &self->lean_finish};
    for (int i = 0; i < 13; i++) {
        *fields[i] = Py_NewRef(a[i]);
    }
    self->validated = PySet_New(NULL);
    if (self->validated == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    slots_probe(&self->state_slots, (PyObject *)Py_TYPE(self->state), STATE_SLOTS, 1);
    slots_probe_attr(&self->hooks_slots, self->state, st->s_hooks, LF_HOOKS_SLOTS, 3);
    slots_probe(&self->meta_slots, metadata_type, METADATA_SLOTS, 3);
    self->eager_type = lf_eager_type(self->task_type);
    self->vectorcall = lf_vectorcall;
    return (PyObject *)self;
fail_fields:
    Py_XDECREF(metadata_type);
    for (int i = 0; i < 3; i++) {
        Py_XDECREF(meta_fields[i]);
    }
    return NULL;
}

#define LF_FIELDS(X) X(fallback) X(state) X(slot) X(cid_var) X(metadata_var) X(make_metadata) \
    X(new_cid) X(validate) X(task_type) X(lean_done) X(starts) X(on_error) X(lean_finish)    \
    X(metadata_type) X(meta_op) X(meta_cid) X(meta_prio) X(last) X(named) X(validated)      \
    X(derived_from) X(derived) X(derived_cid) X(derived_meta) X(dict) X(state_slots.type)       \
    X(hooks_slots.type) X(meta_slots.type) X(eager_type) X(plain_task)

static int
lf_traverse(PyObject *op, visitproc visit, void *arg)
{
    LeanFactoryObject *self = (LeanFactoryObject *)op;
    Py_VISIT(Py_TYPE(op));
#define VISIT(f) Py_VISIT(self->f);
    LF_FIELDS(VISIT)
#undef VISIT
    return 0;
}

static int
lf_clear(PyObject *op)
{
    LeanFactoryObject *self = (LeanFactoryObject *)op;
#define CLEAR(f) Py_CLEAR(self->f);
    LF_FIELDS(CLEAR)
#undef CLEAR
    return 0;
}

static void
lf_dealloc(PyObject *op)
{
    gc_heap_dealloc(op, lf_clear);
}

static PyMemberDef lf_members[] = {
    {"fallback", T_OBJECT, offsetof(LeanFactoryObject, fallback), READONLY,
     "The Python factory, which takes every call off the common path."},
    {"starts", T_OBJECT, offsetof(LeanFactoryObject, starts), READONLY,
     "id(task) -> creation time (ns), while the task runs."},
    {"__dictoffset__", T_PYSSIZET, offsetof(LeanFactoryObject, dict), READONLY},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(LeanFactoryObject, vectorcall), READONLY},
    {NULL},
};

PyDoc_STRVAR(lf_doc,
"LeanFactory(*, fallback, state, slot, cid_var, metadata_var, make_metadata, new_cid, "
"validate, task_type, lean_done, starts, on_error, lean_finish)\n--\n\n"
"The task factory's common path in C (see _speedups_py.LeanFactory).");

static PyType_Slot lf_slots[] = {
    {Py_tp_new, lf_new},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_traverse, lf_traverse},
    {Py_tp_clear, lf_clear},
    {Py_tp_dealloc, lf_dealloc},
    {Py_tp_members, lf_members},
    {Py_tp_doc, (void *)lf_doc},
    {0, NULL},
};

static PyType_Spec lf_spec = {
    .name = "asynctrace._speedups.LeanFactory",
    .basicsize = sizeof(LeanFactoryObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL
             | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = lf_slots,
};

/* ---------------------------------------------------------------------------------------
 * CreateTask: asynctrace.create_task's common call in C (see _speedups_py.CreateTask, and
 * _create_task.create_task, the helper it stands in front of): create_task(coro) with
 * only metadata keywords, on a running loop whose type's create_task is one of readers' (a
 * create_task that only calls the factory: asyncio's, uvloop's; True: the factory read as
 * loop._task_factory, False: as loop.get_task_factory()) and whose factory is of
 * factory_type, calls that factory as
 * loop.create_task would, with all three metadata keywords (None where not given), as the
 * helper's own fast path does. Every other call goes to the helper, as it was made.
 * --------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *slow;         /* the Python create_task */
    PyObject *running;      /* asyncio.events._get_running_loop */
    PyObject *readers;      /* {create_task: True (_task_factory) or False (get_task_factory())} */
    PyObject *factory_type; /* the factories called directly (LeanFactory) */
    PyObject *dict;         /* functools.update_wrapper's attributes */
    vectorcallfunc vectorcall;
} CreateTaskObject;

static PyObject *
ct_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    CreateTaskObject *self = (CreateTaskObject *)op;
    speedups_state *st = PyType_GetModuleState(Py_TYPE(op));
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    int common = st != NULL && nargs == 1;
    PyObject *call[6] = {NULL, NULL, common ? args[0] : NULL, Py_None, Py_None, Py_None};
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; common && i < nkw; i++) {
        int which = lf_keyword(PyTuple_GET_ITEM(kwnames, i), st);
        if (which < 0) {
            return NULL;
        }
        int at = which == KW_OPERATION_NAME ? 3 : which == KW_CORRELATION_ID ? 4
               : which == KW_PRIORITY_HINT ? 5 : 0;
        common = at != 0;
        if (common) {
            call[at] = args[nargs + i];
        }
    }
    PyObject *loop = common ? PyObject_CallNoArgs(self->running) : NULL;
    if (common && loop == NULL) {
        return NULL;
    }
    PyObject *create = NULL, *factory = NULL, *result = NULL;
    if (loop != NULL && loop != Py_None) {
        create = PyObject_GetAttr((PyObject *)Py_TYPE(loop), st->s_create_task);
        PyObject *how = create ? PyDict_GetItemWithError(self->readers, create) : NULL;
        if (how == Py_True) {
            factory = PyObject_GetAttr(loop, st->s__task_factory);
        }
        else if (how == Py_False) {
            factory = PyObject_CallMethodNoArgs(loop, st->s_get_task_factory);
        }
        PyErr_Clear(); /* no such attribute, an unhashable create_task: the helper decides */
    }
    if (factory != NULL && (PyObject *)Py_TYPE(factory) == self->factory_type) {
        call[1] = loop;
        result = PyObject_Vectorcall(factory, call + 1, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                     st->kw_metadata);
    }
    else {
        result = PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
    }
    Py_XDECREF(loop);
    Py_XDECREF(create);
    Py_XDECREF(factory);
    return result;
}

static PyObject *
ct_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"slow", "running", "readers", "factory_type", NULL};
    PyObject *a[4];
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$OOOO:CreateTask", keywords, &a[0], &a[1],
                                     &a[2], &a[3])) {
        return NULL;
    }
    for (int i = 0; i < 2; i++) {
        if (!PyCallable_Check(a[i])) {
            PyErr_Format(PyExc_TypeError, "CreateTask: %s must be callable, got %R",
                         keywords[i], a[i]);
            return NULL;
        }
    }
    if (!PyDict_CheckExact(a[2])) {
        PyErr_Format(PyExc_TypeError, "CreateTask: readers must be a dict, got %R", a[2]);
        return NULL;
    }
    if (!PyType_Check(a[3])) {
        PyErr_Format(PyExc_TypeError, "CreateTask: factory_type must be a type, got %R", a[3]);
        return NULL;
    }
    CreateTaskObject *self = (CreateTaskObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->slow = Py_NewRef(a[0]);
    self->running = Py_NewRef(a[1]);
    self->readers = Py_NewRef(a[2]);
    self->factory_type = Py_NewRef(a[3]);
    self->vectorcall = ct_vectorcall;
    return (PyObject *)self;
}

static int
ct_traverse(PyObject *op, visitproc visit, void *arg)
{
    CreateTaskObject *self = (CreateTaskObject *)op;
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(self->slow);
    Py_VISIT(self->running);
    Py_VISIT(self->readers);
    Py_VISIT(self->factory_type);
    Py_VISIT(self->dict);
    return 0;
}

static int
ct_clear(PyObject *op)
{
    CreateTaskObject *self = (CreateTaskObject *)op;
    Py_CLEAR(self->slow);
    Py_CLEAR(self->running);
    Py_CLEAR(self->readers);
    Py_CLEAR(self->factory_type);
    Py_CLEAR(self->dict);
    return 0;
}

static void
ct_dealloc(PyObject *op)
{
    gc_heap_dealloc(op, ct_clear);
}

static PyMemberDef ct_members[] = {
    {"__dictoffset__", T_PYSSIZET, offsetof(CreateTaskObject, dict), READONLY},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(CreateTaskObject, vectorcall), READONLY},
    {"slow", T_OBJECT, offsetof(CreateTaskObject, slow), READONLY,
     "The helper every other call goes to."},
    {NULL},
};

static PyGetSetDef ct_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL},
};

PyDoc_STRVAR(ct_doc,
"CreateTask(*, slow, running, readers, factory_type)\n--\n\n"
"asynctrace.create_task's common call in C (see _speedups_py.CreateTask).");

static PyType_Slot ct_slots[] = {
    {Py_tp_new, ct_new},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_traverse, ct_traverse},
    {Py_tp_clear, ct_clear},
    {Py_tp_dealloc, ct_dealloc},
    {Py_tp_members, ct_members},
    {Py_tp_getset, ct_getset},
    {Py_tp_doc, (void *)ct_doc},
    {0, NULL},
};

static PyType_Spec ct_spec = {
    .name = "asynctrace._speedups.CreateTask",
    .basicsize = sizeof(CreateTaskObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL
             | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = ct_slots,
};


/* ---------------------------------------------------------------------------------------
 * Counts: the task metrics' per-operation counters and duration histograms, kept in C
 * (see _speedups_py.Counts). started(metadata) and finished(metadata, outcome, duration_ns)
 * are the lean instruments' hooks themselves (TaskMetrics hands them to the hook table), so
 * counting a task calls no Python code. fold() reads them out at scrape time.
 * Free-threaded builds: each update holds the object's critical section.
 * --------------------------------------------------------------------------------------- */

#define MAX_BOUNDS 64
#define NAMES_CACHED 4096 /* names beyond share "_other" anyway: not cached, asked each time */
#define OUTCOMES 3 /* finished, exception, cancelled */

typedef struct {
    unsigned long long trace_high, trace_low, span_id; /* span_id 0: none yet */
    long long duration_ns;
    double time;        /* seconds since the epoch, as time.time() */
} ExemplarData;

static PyObject *int_from_u128(unsigned long long high, unsigned long long low);
static int int_to_u128(PyObject *value, const char *what, unsigned long long *high,
                       unsigned long long *low);

typedef struct {
    long long created;
    long long sum_ns[OUTCOMES];
    long long counts[OUTCOMES][MAX_BOUNDS + 1];
    ExemplarData *exemplars; /* [OUTCOMES][MAX_BOUNDS + 1], made at the first; or NULL */
} SeriesData;

typedef struct {
    PyObject_HEAD
    PyObject *label;       /* operation name (or None) -> label str */
    PyObject *by_label;    /* label -> capsule of SeriesData */
    PyObject *by_name;     /* operation name -> the same capsule (at most NAMES_CACHED) */
    PyObject *last_name;   /* the operation name last seen (strong), or NULL */
    SeriesData *last;      /* its series */
    PyObject *outcomes[OUTCOMES];
    Py_ssize_t nbounds;
    long long bounds[MAX_BOUNDS];
    Slots meta_slots;      /* the metadata's type (the first seen, with a GIL): see Slots */
} CountsObject;

static void
series_free(PyObject *capsule)
{
    SeriesData *data = PyCapsule_GetPointer(capsule, "asynctrace.series");
    if (data != NULL) {
        PyMem_Free(data->exemplars);
    }
    PyMem_Free(data);
}

/* The index of outcome in self->outcomes, or -1 with ValueError set. */
static int
counts_outcome(CountsObject *self, PyObject *outcome)
{
    for (int i = 0; i < OUTCOMES; i++) {
        if (outcome == self->outcomes[i]) {
            return i;
        }
    }
    for (int i = 0; i < OUTCOMES; i++) {
        int eq = PyObject_RichCompareBool(outcome, self->outcomes[i], Py_EQ);
        if (eq != 0) {
            return eq < 0 ? -1 : i;
        }
    }
    PyErr_Format(PyExc_ValueError, "Invalid outcome: %R", outcome);
    return -1;
}

/* The bucket of a duration: the first bound not below it (bisect_left), past the last. */
static Py_ssize_t
counts_bucket(CountsObject *self, long long duration)
{
    Py_ssize_t lo = 0, hi = self->nbounds;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (self->bounds[mid] < duration) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    return lo;
}

/* The series of a task with this metadata (borrowed; NULL with an exception set). Called
   inside the critical section. */
static SeriesData *
counts_series(CountsObject *self, PyObject *metadata, PyObject *op_name_str)
{
    slots_probe_first(&self->meta_slots, metadata, METADATA_SLOTS, 3);
    PyObject *name = slots_get(&self->meta_slots, metadata, MD_OPERATION, op_name_str);
    if (name == NULL) {
        return NULL;
    }
    if (self->last != NULL && name == self->last_name) {
        Py_DECREF(name);
        return self->last;
    }
    PyObject *known = PyDict_GetItemWithError(self->by_name, name);
    if (known != NULL) {
        Py_XSETREF(self->last_name, name);
        self->last = PyCapsule_GetPointer(known, "asynctrace.series");
        return self->last;
    }
    if (PyErr_Occurred()) {
        Py_DECREF(name);
        return NULL;
    }
    PyObject *label = PyObject_CallOneArg(self->label, name);
    if (label == NULL) {
        Py_DECREF(name);
        return NULL;
    }
    PyObject *capsule = PyDict_GetItemWithError(self->by_label, label);
    SeriesData *data;
    if (capsule != NULL) {
        data = PyCapsule_GetPointer(capsule, "asynctrace.series");
    }
    else {
        if (PyErr_Occurred()) {
            goto fail;
        }
        data = PyMem_Calloc(1, sizeof(SeriesData));
        if (data == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        capsule = PyCapsule_New(data, "asynctrace.series", series_free);
        if (capsule == NULL) {
            PyMem_Free(data);
            goto fail;
        }
        int bad = PyDict_SetItem(self->by_label, label, capsule);
        Py_DECREF(capsule); /* the dict holds it */
        if (bad < 0) {
            goto fail;
        }
    }
    capsule = PyDict_GetItemWithError(self->by_label, label); /* borrowed, held by the dict */
    if (capsule == NULL
        || (PyDict_GET_SIZE(self->by_name) < NAMES_CACHED
            && PyDict_SetItem(self->by_name, name, capsule) < 0)) {
        goto fail;
    }
    Py_DECREF(label);
    Py_XSETREF(self->last_name, name);
    self->last = data;
    return data;
fail:
    Py_DECREF(label);
    Py_DECREF(name);
    return NULL;
}

static PyObject *
counts_started(PyObject *op, PyObject *metadata)
{
    CountsObject *self = (CountsObject *)op;
    speedups_state *st = PyType_GetModuleState(Py_TYPE(op));
    int ok;
    Py_BEGIN_CRITICAL_SECTION(op);
    SeriesData *data = counts_series(self, metadata, st->s_operation_name);
    ok = (data != NULL);
    if (ok) {
        data->created++;
    }
    Py_END_CRITICAL_SECTION();
    if (!ok) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
counts_finished(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    CountsObject *self = (CountsObject *)op;
    speedups_state *st = PyType_GetModuleState(Py_TYPE(op));
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "finished() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    int outcome = counts_outcome(self, args[1]);
    if (outcome < 0) {
        return NULL;
    }
    long long duration = PyLong_AsLongLong(args[2]);
    if (duration == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (duration < 0) {
        duration = 0;
    }
    Py_ssize_t lo = counts_bucket(self, duration);
    int ok;
    Py_BEGIN_CRITICAL_SECTION(op);
    SeriesData *data = counts_series(self, args[0], st->s_operation_name);
    ok = (data != NULL);
    if (ok) {
        data->counts[outcome][lo]++;
        data->sum_ns[outcome] += duration;
    }
    Py_END_CRITICAL_SECTION();
    if (!ok) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The exemplar of a task's span in its bucket (the latest wins): what exemplar() does, with
   the ids as C values (SpanHooks calls it so when the hook is a Counts' exemplar). */
static int
counts_exemplar_ids(CountsObject *self, PyObject *metadata, int outcome, long long duration,
                    unsigned long long trace_high, unsigned long long trace_low,
                    unsigned long long span_id, speedups_state *st)
{
    Py_ssize_t bucket = counts_bucket(self, duration < 0 ? 0 : duration);
    struct timespec now;
    double seconds = 0.0;
    if (timespec_get(&now, TIME_UTC) == TIME_UTC) {
        seconds = (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
    }
    int ok;
    Py_BEGIN_CRITICAL_SECTION(self);
    SeriesData *data = counts_series(self, metadata, st->s_operation_name);
    if (data != NULL && data->exemplars == NULL) {
        data->exemplars = PyMem_Calloc(OUTCOMES * (MAX_BOUNDS + 1), sizeof(ExemplarData));
        if (data->exemplars == NULL) {
            PyErr_NoMemory();
            data = NULL;
        }
    }
    ok = (data != NULL);
    if (ok) {
        ExemplarData *e = &data->exemplars[outcome * (MAX_BOUNDS + 1) + bucket];
        e->trace_high = trace_high;
        e->trace_low = trace_low;
        e->span_id = span_id;
        e->duration_ns = duration;
        e->time = seconds;
    }
    Py_END_CRITICAL_SECTION();
    return ok ? 0 : -1;
}

/* exemplar(metadata, outcome, duration_ns, trace_id, span_id): see _speedups_py.Counts. The
   ids are kept as C values: a trace id in [0, 2**128), a span id in [1, 2**64). */
static PyObject *
counts_exemplar(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    CountsObject *self = (CountsObject *)op;
    speedups_state *st = PyType_GetModuleState(Py_TYPE(op));
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "exemplar() takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    int outcome = counts_outcome(self, args[1]);
    if (outcome < 0) {
        return NULL;
    }
    long long duration = PyLong_AsLongLong(args[2]);
    if (duration == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!PyLong_Check(args[3]) || !PyLong_Check(args[4])) {
        PyErr_Format(PyExc_TypeError, "exemplar(): trace_id and span_id must be ints, got %R, %R",
                     args[3], args[4]);
        return NULL;
    }
    unsigned long long high, low;
    if (int_to_u128(args[3], "exemplar(): trace_id", &high, &low) < 0) {
        return NULL;
    }
    unsigned long long span_id = PyLong_AsUnsignedLongLong(args[4]);
    if ((span_id == (unsigned long long)-1 && PyErr_Occurred()) || span_id == 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "exemplar(): span_id must be an int in [1, 2**64), got %R",
                     args[4]);
        return NULL;
    }
    if (counts_exemplar_ids(self, args[0], outcome, duration, high, low, span_id, st) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* {(label, outcome): [None or (trace_id, span_id, duration_ns, time) per bucket]}. */
static PyObject *
counts_fold_exemplars(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    CountsObject *self = (CountsObject *)op;
    PyObject *result = PyDict_New();
    if (result == NULL) {
        return NULL;
    }
    int ok = 1;
    Py_BEGIN_CRITICAL_SECTION(op);
    Py_ssize_t pos = 0;
    PyObject *label, *capsule;
    while (ok && PyDict_Next(self->by_label, &pos, &label, &capsule)) {
        SeriesData *data = PyCapsule_GetPointer(capsule, "asynctrace.series");
        if (data == NULL || data->exemplars == NULL) {
            ok = data != NULL;
            continue;
        }
        for (int o = 0; ok && o < OUTCOMES; o++) {
            ExemplarData *row = &data->exemplars[o * (MAX_BOUNDS + 1)];
            int any = 0;
            for (Py_ssize_t i = 0; i <= self->nbounds; i++) {
                any |= row[i].span_id != 0;
            }
            if (!any) {
                continue;
            }
            PyObject *list = PyList_New(self->nbounds + 1);
            for (Py_ssize_t i = 0; list != NULL && i <= self->nbounds; i++) {
                PyObject *item = NULL;
                if (row[i].span_id == 0) {
                    item = Py_NewRef(Py_None);
                }
                else {
                    PyObject *trace_id = int_from_u128(row[i].trace_high, row[i].trace_low);
                    item = trace_id ? Py_BuildValue("(NKLd)", trace_id, row[i].span_id,
                                                    row[i].duration_ns, row[i].time)
                                    : NULL;
                }
                if (item == NULL) {
                    Py_CLEAR(list);
                    break;
                }
                PyList_SET_ITEM(list, i, item);
            }
            PyObject *key = list ? PyTuple_Pack(2, label, self->outcomes[o]) : NULL;
            ok = key != NULL && PyDict_SetItem(result, key, list) == 0;
            Py_XDECREF(key);
            Py_XDECREF(list);
        }
    }
    Py_END_CRITICAL_SECTION();
    if (!ok) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

static PyObject *
counts_fold(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    CountsObject *self = (CountsObject *)op;
    PyObject *created = PyDict_New(), *series = PyDict_New(), *result = NULL;
    if (created == NULL || series == NULL) {
        goto done;
    }
    PyObject *by_label = NULL;
    Py_BEGIN_CRITICAL_SECTION(op);
    by_label = PyDict_Copy(self->by_label);
    Py_END_CRITICAL_SECTION();
    if (by_label == NULL) {
        goto done;
    }
    Py_ssize_t pos = 0;
    PyObject *label, *capsule;
    while (PyDict_Next(by_label, &pos, &label, &capsule)) {
        SeriesData copy;
        Py_BEGIN_CRITICAL_SECTION(op);
        memcpy(&copy, PyCapsule_GetPointer(capsule, "asynctrace.series"), sizeof(copy));
        Py_END_CRITICAL_SECTION();
        PyObject *n = PyLong_FromLongLong(copy.created);
        if (n == NULL || PyDict_SetItem(created, label, n) < 0) {
            Py_XDECREF(n);
            goto fail;
        }
        Py_DECREF(n);
        for (int o = 0; o < OUTCOMES; o++) {
            long long total = 0;
            for (Py_ssize_t i = 0; i <= self->nbounds; i++) {
                total += copy.counts[o][i];
            }
            if (total == 0) {
                continue;
            }
            PyObject *counts = PyList_New(self->nbounds + 1);
            if (counts == NULL) {
                goto fail;
            }
            for (Py_ssize_t i = 0; i <= self->nbounds; i++) {
                PyObject *c = PyLong_FromLongLong(copy.counts[o][i]);
                if (c == NULL) {
                    Py_DECREF(counts);
                    goto fail;
                }
                PyList_SET_ITEM(counts, i, c);
            }
            PyObject *key = PyTuple_Pack(2, label, self->outcomes[o]);
            PyObject *value = Py_BuildValue("(NL)", counts, copy.sum_ns[o]);
            int bad = key == NULL || value == NULL || PyDict_SetItem(series, key, value) < 0;
            Py_XDECREF(key);
            Py_XDECREF(value);
            if (bad) {
                goto fail;
            }
        }
    }
    result = PyTuple_Pack(2, created, series);
fail:
    Py_DECREF(by_label);
done:
    Py_XDECREF(created);
    Py_XDECREF(series);
    return result;
}

static PyObject *
counts_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"bounds_ns", "label", NULL};
    PyObject *bounds, *label;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:Counts", keywords, &bounds, &label)) {
        return NULL;
    }
    if (!PyTuple_Check(bounds) || PyTuple_GET_SIZE(bounds) > MAX_BOUNDS
        || PyTuple_GET_SIZE(bounds) == 0) {
        PyErr_Format(PyExc_ValueError, "Counts: bounds_ns must be a tuple of 1 to %d ints, got %R",
                     MAX_BOUNDS, bounds);
        return NULL;
    }
    if (!PyCallable_Check(label)) {
        PyErr_Format(PyExc_TypeError, "Counts: label must be callable, got %R", label);
        return NULL;
    }
    CountsObject *self = (CountsObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->nbounds = PyTuple_GET_SIZE(bounds);
    for (Py_ssize_t i = 0; i < self->nbounds; i++) {
        self->bounds[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(bounds, i));
        if (self->bounds[i] == -1 && PyErr_Occurred()) {
            Py_DECREF(self);
            return NULL;
        }
        if (i > 0 && self->bounds[i] <= self->bounds[i - 1]) {
            Py_DECREF(self);
            PyErr_Format(PyExc_ValueError, "Counts: bounds_ns must increase, got %R", bounds);
            return NULL;
        }
    }
    self->label = Py_NewRef(label);
    self->by_label = PyDict_New();
    self->by_name = PyDict_New();
    self->outcomes[0] = PyUnicode_InternFromString("finished");
    self->outcomes[1] = PyUnicode_InternFromString("exception");
    self->outcomes[2] = PyUnicode_InternFromString("cancelled");
    if (self->by_label == NULL || self->by_name == NULL || !self->outcomes[0] || !self->outcomes[1] || !self->outcomes[2]) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
counts_traverse(PyObject *op, visitproc visit, void *arg)
{
    CountsObject *self = (CountsObject *)op;
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(self->label);
    Py_VISIT(self->by_label);
    Py_VISIT(self->by_name);
    Py_VISIT(self->meta_slots.type);
    return 0;
}

static int
counts_clear(PyObject *op)
{
    CountsObject *self = (CountsObject *)op;
    Py_CLEAR(self->label);
    Py_CLEAR(self->by_label);
    Py_CLEAR(self->by_name);
    Py_CLEAR(self->last_name);
    Py_CLEAR(self->meta_slots.type);
    self->last = NULL;
    for (int i = 0; i < OUTCOMES; i++) {
        Py_CLEAR(self->outcomes[i]);
    }
    return 0;
}

static void
counts_dealloc(PyObject *op)
{
    gc_heap_dealloc(op, counts_clear);
}

static PyMethodDef counts_methods[] = {
    {"started", (PyCFunction)counts_started, METH_O, "Count a task created with this metadata."},
    {"finished", (PyCFunction)(void (*)(void))counts_finished, METH_FASTCALL,
     "finished(metadata, outcome, duration_ns): put a task's duration in its histogram."},
    {"fold", counts_fold, METH_NOARGS,
     "(created: {label: n}, series: {(label, outcome): (counts, sum_ns)})."},
    {"exemplar", (PyCFunction)(void (*)(void))counts_exemplar, METH_FASTCALL,
     "exemplar(metadata, outcome, duration_ns, trace_id, span_id): the bucket's exemplar."},
    {"fold_exemplars", counts_fold_exemplars, METH_NOARGS,
     "{(label, outcome): [None or (trace_id, span_id, duration_ns, time) per bucket]}."},
    {NULL},
};

PyDoc_STRVAR(counts_doc,
"Counts(bounds_ns, label)\n--\n\n"
"Per-operation task counts and duration histograms in C (see _speedups_py.Counts).");

static PyType_Slot counts_slots[] = {
    {Py_tp_new, counts_new},
    {Py_tp_traverse, counts_traverse},
    {Py_tp_clear, counts_clear},
    {Py_tp_dealloc, counts_dealloc},
    {Py_tp_methods, counts_methods},
    {Py_tp_doc, (void *)counts_doc},
    {0, NULL},
};

static PyType_Spec counts_spec = {
    .name = "asynctrace._speedups.Counts",
    .basicsize = sizeof(CountsObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = counts_slots,
};

/* ---------------------------------------------------------------------------------------
 * LeanDone: the done callback of the lean path (see _speedups_py.LeanDone). mark(task)
 * runs inside the task's last step (the tap); __call__ from a Handle. It takes the end time,
 * reads the task's metadata from the context it runs in, and calls the lean instruments'
 * task_finished hooks (C ones, Counts.finished, call no Python code); for a task whose entry
 * is hooks.begin's (a traced task's span handle), then hooks.end with it.
 * --------------------------------------------------------------------------------------- */

struct LeanDoneObject {
    PyObject_HEAD
    PyObject *starts;       /* the Starts table: id(task) -> creation time (ns) or entry */
    PyObject *metadata_var;
    PyObject *no_metadata;  /* for a task whose context has none */
    PyObject *state;        /* STATE: .hooks.finished, .hooks.cancelled */
    PyObject *on_error;     /* (hook, exception): counted, or re-raised */
    PyObject *on_cancelled; /* (task, metadata): the cancellation hooks */
    PyObject *outcomes[OUTCOMES];
    Slots state_slots;      /* STATE.hooks */
    Slots hooks_slots;      /* its finished, end */
};

static const char *const LD_HOOKS_SLOTS[2] = {"finished", "end"};
enum { LD_FINISHED, LD_END };

/* hooks.end(task, entry, metadata, outcome, finished_ns): what hooks.begin started ends. */
static int
ld_end(LeanDoneObject *self, PyObject *hooks, PyObject *task, PyObject *entry,
       PyObject *metadata, int outcome, long long finished_ns, speedups_state *st)
{
    PyObject *end = slots_get(&self->hooks_slots, hooks, LD_END, st->s_end);
    if (end == NULL) {
        return -1;
    }
    if (end == Py_None) {
        Py_DECREF(end);
        return 0;
    }
    PyObject *span_hooks = span_hooks_of(end, sh_end);
    PyObject *fin = span_hooks ? NULL : PyLong_FromLongLong(finished_ns);
    if (span_hooks == NULL && fin == NULL) {
        Py_DECREF(end);
        return -1;
    }
    PyObject *call_args[5] = {task, entry, metadata, self->outcomes[outcome], fin};
    PyObject *res = span_hooks ? sh_end_ns(span_hooks, task, entry, metadata,
                                           self->outcomes[outcome], finished_ns, NULL)
                               : PyObject_Vectorcall(end, call_args, 5, NULL);
    Py_XDECREF(fin);
    int rc = 0;
    if (res == NULL) {
        rc = hook_failed(self->on_error, end);
    }
    Py_XDECREF(res);
    Py_DECREF(end);
    return rc;
}

static int
ld_finish(LeanDoneObject *self, PyObject *task)
{
    long long finished_ns = perf_counter_ns();
    speedups_state *st = PyType_GetModuleState(Py_TYPE(self));
    PyObject *entry = NULL;
    long long created_ns = 0;
    if (starts_pop((StartsObject *)self->starts, (uintptr_t)task, &entry, &created_ns) == 0) {
        return 0; /* not noted (forgotten at uninstall) */
    }
    if (entry != NULL && PyLong_CheckExact(entry)) { /* a time out of the tagged range */
        created_ns = PyLong_AsLongLong(entry);
        Py_CLEAR(entry);
    }
    else if (entry != NULL && PyObject_TypeCheck(entry, st->span_ids_type)) {
        created_ns = IDS(entry)->created_ns; /* a span handle */
    }
    else if (entry != NULL) { /* another hooks.begin's entry: it has created_ns */
        PyObject *created = PyObject_GetAttr(entry, st->s_created_ns);
        created_ns = created ? PyLong_AsLongLong(created) : -1;
        Py_XDECREF(created);
    }
    if (created_ns == -1 && PyErr_Occurred()) {
        Py_XDECREF(entry);
        return -1;
    }
    int rc = ld_record(self, task, entry, NULL, created_ns, finished_ns);
    Py_XDECREF(entry);
    return rc;
}

/* What the end of a task reports (see _speedups_py.LeanDone.record): the finished hooks,
   the cancellation hooks, hooks.end with entry (borrowed; NULL: none). metadata (borrowed)
   NULL: read from the current context (the task's, inside its last step). */
static int
ld_record(LeanDoneObject *self, PyObject *task, PyObject *entry, PyObject *given,
          long long created_ns, long long finished_ns)
{
    speedups_state *st = PyType_GetModuleState(Py_TYPE(self));
    PyObject *metadata = NULL, *hooks = NULL, *finished = NULL, *duration = NULL;
    int rc = -1;
    if (given != NULL) {
        metadata = Py_NewRef(given);
    }
    else if (PyContextVar_Get(self->metadata_var, NULL, &metadata) < 0) {
        return -1;
    }
    if (metadata == NULL || metadata == Py_None) {
        Py_XSETREF(metadata, Py_NewRef(self->no_metadata));
    }
    PyObject *cancelled = PyObject_CallMethodNoArgs(task, st->s_cancelled);
    if (cancelled == NULL) {
        goto done;
    }
    int outcome = 2;
    int is_cancelled = (cancelled == Py_True);
    Py_DECREF(cancelled);
    if (!is_cancelled) {
        PyObject *exc = PyObject_GetAttr(task, st->s__exception);
        if (exc == NULL) {
            goto done;
        }
        outcome = (exc == Py_None) ? 0 : 1;
        Py_DECREF(exc);
    }
    hooks = slots_get(&self->state_slots, self->state, 0, st->s_hooks);
    if (hooks == NULL) {
        goto done;
    }
    finished = slots_get(&self->hooks_slots, hooks, LD_FINISHED, st->s_finished);
    if (finished == NULL || !PyTuple_Check(finished)) {
        if (finished != NULL) {
            PyErr_SetString(PyExc_TypeError, "hooks.finished must be a tuple");
        }
        goto done;
    }
    duration = PyLong_FromLongLong(finished_ns - created_ns);
    if (duration == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(finished); i++) {
        PyObject *hook = PyTuple_GET_ITEM(finished, i);
        PyObject *call_args[3] = {metadata, self->outcomes[outcome], duration};
        PyObject *res = PyObject_Vectorcall(hook, call_args, 3, NULL);
        if (res != NULL) {
            Py_DECREF(res);
            continue;
        }
        if (hook_failed(self->on_error, hook) < 0) {
            goto done;
        }
    }
    if (is_cancelled) {
        PyObject *res = PyObject_CallFunctionObjArgs(self->on_cancelled, task, metadata, NULL);
        if (res == NULL) {
            goto done;
        }
        Py_DECREF(res);
    }
    if (entry != NULL && ld_end(self, hooks, task, entry, metadata, outcome, finished_ns, st) < 0) {
        goto done;
    }
    rc = 0;
done:
    Py_XDECREF(duration);
    Py_XDECREF(finished);
    Py_XDECREF(hooks);
    Py_XDECREF(metadata);
    return rc;
}

static PyObject *
ld_mark(PyObject *op, PyObject *task)
{
    if (ld_finish((LeanDoneObject *)op, task) < 0) {
        return NULL;
    }
    Py_RETURN_TRUE;
}

static PyObject *
ld_call(PyObject *op, PyObject *args, PyObject *kwargs)
{
    PyObject *task;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "LeanDone() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "LeanDone", 1, 1, &task)) {
        return NULL;
    }
    if (ld_finish((LeanDoneObject *)op, task) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
ld_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {
        "metadata_var", "no_metadata", "state", "on_error", "on_cancelled", NULL};
    PyObject *a[5];
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$OOOOO:LeanDone", keywords, &a[0], &a[1],
                                     &a[2], &a[3], &a[4])) {
        return NULL;
    }
    if (!PyContextVar_CheckExact(a[0])) {
        PyErr_Format(PyExc_TypeError, "LeanDone: metadata_var must be a ContextVar, got %R", a[0]);
        return NULL;
    }
    LeanDoneObject *self = (LeanDoneObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    speedups_state *st = PyType_GetModuleState(type);
    self->starts = PyObject_CallNoArgs((PyObject *)st->starts_type);
    self->metadata_var = Py_NewRef(a[0]);
    self->no_metadata = Py_NewRef(a[1]);
    self->state = Py_NewRef(a[2]);
    self->on_error = Py_NewRef(a[3]);
    self->on_cancelled = Py_NewRef(a[4]);
    self->outcomes[0] = PyUnicode_InternFromString("finished");
    self->outcomes[1] = PyUnicode_InternFromString("exception");
    self->outcomes[2] = PyUnicode_InternFromString("cancelled");
    if (!self->starts || !self->outcomes[0] || !self->outcomes[1] || !self->outcomes[2]) {
        Py_DECREF(self);
        return NULL;
    }
    slots_probe(&self->state_slots, (PyObject *)Py_TYPE(self->state), STATE_SLOTS, 1);
    slots_probe_attr(&self->hooks_slots, self->state, st->s_hooks, LD_HOOKS_SLOTS, 2);
    return (PyObject *)self;
}

static int
ld_traverse(PyObject *op, visitproc visit, void *arg)
{
    LeanDoneObject *self = (LeanDoneObject *)op;
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(self->starts);
    Py_VISIT(self->metadata_var);
    Py_VISIT(self->no_metadata);
    Py_VISIT(self->state);
    Py_VISIT(self->on_error);
    Py_VISIT(self->on_cancelled);
    Py_VISIT(self->state_slots.type);
    Py_VISIT(self->hooks_slots.type);
    return 0;
}

static int
ld_clear(PyObject *op)
{
    LeanDoneObject *self = (LeanDoneObject *)op;
    Py_CLEAR(self->starts);
    Py_CLEAR(self->metadata_var);
    Py_CLEAR(self->no_metadata);
    Py_CLEAR(self->state);
    Py_CLEAR(self->on_error);
    Py_CLEAR(self->on_cancelled);
    Py_CLEAR(self->state_slots.type);
    Py_CLEAR(self->hooks_slots.type);
    for (int i = 0; i < OUTCOMES; i++) {
        Py_CLEAR(self->outcomes[i]);
    }
    return 0;
}

static void
ld_dealloc(PyObject *op)
{
    gc_heap_dealloc(op, ld_clear);
}

static PyMethodDef ld_methods[] = {
    {"mark", ld_mark, METH_O,
     "Called by the loop's tap the moment the task is done: record it now; True."},
    {NULL},
};

static PyMemberDef ld_members[] = {
    {"starts", T_OBJECT, offsetof(LeanDoneObject, starts), READONLY,
     "id(task) -> creation time (ns), while the task runs."},
    {NULL},
};

PyDoc_STRVAR(ld_doc,
"LeanDone(*, metadata_var, no_metadata, state, on_error, on_cancelled)\n--\n\n"
"The lean path's done callback in C (see _speedups_py.LeanDone).");

static PyType_Slot ld_slots[] = {
    {Py_tp_new, ld_new},
    {Py_tp_call, ld_call},
    {Py_tp_traverse, ld_traverse},
    {Py_tp_clear, ld_clear},
    {Py_tp_dealloc, ld_dealloc},
    {Py_tp_methods, ld_methods},
    {Py_tp_members, ld_members},
    {Py_tp_doc, (void *)ld_doc},
    {0, NULL},
};

static PyType_Spec ld_spec = {
    .name = "asynctrace._speedups.LeanDone",
    .basicsize = sizeof(LeanDoneObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = ld_slots,
};


/* ---------------------------------------------------------------------------------------
 * The batched check: a task's end without a done callback of asynctrace's own.
 *
 * asynctrace's done callback takes a task's first callback slot, so the callback of whatever
 * awaits the task (gather's, a TaskGroup's, an awaiting task's wakeup) goes to the list
 * CPython makes for a second one: a list and a tuple more per pending task, walked by the
 * cycle collector. Most tasks do not need asynctrace's: a callback that is never removed is
 * scheduled through the loop's call_soon, the tap, the moment the task ends, inside its last
 * step, and the tap records the end then (tap_mark_task), as it does for its own marker.
 *
 * Whether a task has such a callback is known only once its creator has attached it, after
 * the task is made. So the tasks the factory makes while a check is pending go to the loop's
 * batch (task and context), and only the first one's first step is scheduled through the
 * check (tap_schedule_check): the loop's ready queue is first in, first out, so the check
 * runs after the step that made them (which attached its callbacks: gather, TaskGroup and
 * an awaiting task all do so before that step ends) and before any of their first steps.
 * It adds asynctrace's callback to each batched task that has no callback known never to be
 * removed (an awaiting task's wakeup, gather's, TaskGroup's; asyncio.wait, wait_for,
 * as_completed and shield remove theirs), then runs the step it stands in for. An eager
 * task's first step runs inside Task(), so for it the factory schedules the check (a Handle
 * of its own, standing for no step) before making the task.
 * Only with the GIL (a free-threaded build keeps the callback per task) and only for one
 * task type per tap, asyncio's C Task (a first step not a TaskStepMethWrapper is not
 * batched).
 * --------------------------------------------------------------------------------------- */

/* Whether callback is a C task's step (the type of _asyncio's TaskStepMethWrapper). */
static int
tap_is_step(TapObject *self, PyObject *callback)
{
    PyTypeObject *type = Py_TYPE(callback);
    if ((PyObject *)type == self->step_type) {
        return 1;
    }
    if (self->step_type != NULL) {
        return 0;
    }
    const char *name = strrchr(type->tp_name, '.');
    name = name == NULL ? type->tp_name : name + 1;
    if (strcmp(name, "TaskStepMethWrapper") != 0) {
        return 0;
    }
    self->step_type = Py_NewRef(type);
    return 1;
}

/* The first step of a batch's first task, scheduled through the check instead. */
static PyObject *tap_check(PyObject *op, PyObject *unused);

static PyMethodDef tap_check_def = {
    "asynctrace_batch_check", tap_check, METH_NOARGS,
    "asynctrace's check of the tasks made since it was scheduled; then the step it stands for."};

/* call_soon(check, context=context) in place of call_soon(step, context=context): the
   Handle the step would have had, with no arguments; the step is kept here till then (one
   check is pending at a time). For an eager task (step NULL) it is scheduled before the
   task's first step runs, in Task(), so it comes before whatever that step schedules. */
static PyObject *
tap_schedule_check(TapObject *self, PyObject *step, PyObject *context)
{
    if (self->check == NULL) {
        self->check = PyCFunction_New(&tap_check_def, (PyObject *)self);
        if (self->check == NULL) {
            return NULL;
        }
    }
    speedups_state *st = PyType_GetModuleState(Py_TYPE(self));
    PyObject *stack[2] = {self->check, context};
    PyObject *handle = PyObject_Vectorcall(self->call_soon, stack, 1, st->kw_context);
    if (handle != NULL) {
        self->pending = 1;
        Py_XSETREF(self->step, Py_XNewRef(step));
    }
    return handle;
}

/* Whether callback is one asyncio never removes (see above). */
static int
tap_is_kept(TapObject *self, PyObject *callback)
{
    PyObject *known;
    if (PyCFunction_Check(callback)) {
        return strcmp(((PyCFunctionObject *)callback)->m_ml->ml_name, "task_wakeup") == 0;
    }
    else if (PyMethod_Check(callback)) {
        known = PyMethod_GET_FUNCTION(callback);
    }
    else if (PyFunction_Check(callback)) {
        known = PyFunction_GET_CODE(callback);
    }
    else {
        return 0;
    }
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(self->kept); k++) {
        if (PyTuple_GET_ITEM(self->kept, k) == known) {
            return 1;
        }
    }
    return 0;
}

/* Whether a list of (callback, context) tuples (NULL, None: none) holds a kept callback. */
static int
tap_list_keeps(TapObject *self, PyObject *list)
{
    for (Py_ssize_t i = 0; list != NULL && PyList_Check(list) && i < PyList_GET_SIZE(list); i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) > 0
            && tap_is_kept(self, PyTuple_GET_ITEM(item, 0))) {
            return 1;
        }
    }
    return 0;
}

/* The C Future's callback fields: the first callback and its context inline, the others in
   a list of (callback, context) tuples. CPython's private struct (Modules/_asynciomodule.c,
   FutureObj_HEAD), the same first fields from 3.7 to 3.14: read on those versions with the
   GIL once a probe (tap_probe_layout) found them where expected, else task._callbacks,
   which builds that list anew. */
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030F0000 && !defined(Py_GIL_DISABLED)
#define FUTURE_FIELDS 1
typedef struct {
    PyObject_HEAD
    PyObject *fut_loop;
    PyObject *fut_callback0;
    PyObject *fut_context0;
    PyObject *fut_callbacks;
} FutureFields;
#else
#define FUTURE_FIELDS 0
#endif

/* 1 when task's fields are where FutureFields says (its loop and its callbacks as
   task._callbacks gives them), -1 when not, -2 on error. */
static int
tap_probe_layout(PyObject *task, speedups_state *st)
{
#if FUTURE_FIELDS
    PyObject *loop = PyObject_GetAttrString(task, "_loop");
    PyObject *callbacks = loop == NULL ? NULL : PyObject_GetAttr(task, st->s__callbacks);
    if (callbacks == NULL) {
        Py_XDECREF(loop);
        return -2;
    }
    FutureFields *f = (FutureFields *)task;
    Py_ssize_t given = PyList_Check(callbacks) ? PyList_GET_SIZE(callbacks) : 0;
    int ok = f->fut_loop == loop
             && (f->fut_callbacks == NULL || PyList_CheckExact(f->fut_callbacks))
             && (f->fut_callback0 == NULL || f->fut_context0 != NULL)
             && given == (f->fut_callback0 != NULL)
                         + (f->fut_callbacks ? PyList_GET_SIZE(f->fut_callbacks) : 0)
             && (given == 0 || f->fut_callback0 == NULL
                 || PyTuple_GET_ITEM(PyList_GET_ITEM(callbacks, 0), 0) == f->fut_callback0);
    Py_DECREF(loop);
    Py_DECREF(callbacks);
    return ok ? 1 : -1;
#else
    (void)task, (void)st;
    return -1;
#endif
}

/* 1 when task has a done callback that is never removed (see above), 0 when not, -1 error. */
static int
tap_keeps_callback(TapObject *self, PyObject *task, speedups_state *st)
{
    if (self->layout == 0) {
        int probed = tap_probe_layout(task, st);
        if (probed == -2) {
            return -1;
        }
        self->layout = probed;
    }
#if FUTURE_FIELDS
    if (self->layout == 1) {
        FutureFields *f = (FutureFields *)task;
        if (f->fut_callback0 != NULL && tap_is_kept(self, f->fut_callback0)) {
            return 1;
        }
        return tap_list_keeps(self, f->fut_callbacks);
    }
#endif
    PyObject *callbacks = PyObject_GetAttr(task, st->s__callbacks);
    if (callbacks == NULL) {
        return -1;
    }
    int found = tap_list_keeps(self, callbacks);
    Py_DECREF(callbacks);
    return found;
}

static PyObject *
tap_check(PyObject *op, PyObject *unused)
{
    TapObject *self = (TapObject *)op;
    speedups_state *st = PyType_GetModuleState(Py_TYPE(op));
    /* Taken out first: a task made from here on starts the next batch. */
    PyObject *step = self->step;
    self->step = NULL;
    PyObject **batch = self->batch;
    Py_ssize_t len = self->batch_len;
    self->batch = NULL;
    self->batch_len = self->batch_cap = 0;
    self->pending = 0;
    PyObject *done = Py_XNewRef(self->done);
    for (Py_ssize_t i = 0; i < len; i++) {
        PyObject *task = batch[2 * i], *context = batch[2 * i + 1];
        int keeps = tap_keeps_callback(self, task, st);
        if (keeps < 0) {
            PyErr_Clear();  /* not known: asynctrace's callback, as without the check */
            keeps = 0;
        }
        if (!keeps && done != NULL) {
            PyObject *args[3] = {task, done, context};
            PyObject *r = PyObject_VectorcallMethod(st->s_add_done_callback, args,
                                                    2 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                                    st->kw_context);
            if (r == NULL) {
                PyErr_WriteUnraisable(task);
            }
            Py_XDECREF(r);
        }
        Py_DECREF(task);
        Py_DECREF(context);
    }
    PyMem_Free(batch);
    Py_XDECREF(done);
    if (step == NULL) {
        Py_RETURN_NONE;  /* an eager task's check stands for no step (or the tap was cleared) */
    }
    PyObject *result = PyObject_CallNoArgs(step);
    Py_DECREF(step);
    return result;
}

/* A noted task's callback is being scheduled: if the task is done, its end is now. */
static int
tap_mark_task(TapObject *self, PyObject *task)
{
    LeanDoneObject *done = (LeanDoneObject *)self->done;
    if (done->starts == NULL
        || starts_find((StartsObject *)done->starts, (uintptr_t)task) == NULL) {
        return 0;
    }
    speedups_state *st = PyType_GetModuleState(Py_TYPE(self));
    PyObject *is_done = PyObject_CallMethodNoArgs(task, st->s_done);
    if (is_done == NULL) {
        return -1;
    }
    int ended = (is_done == Py_True);
    Py_DECREF(is_done);
    if (!ended) {
        return 0;  /* someone's call_soon(callback, task) while it runs */
    }
    Py_INCREF(done);
    int rc = ld_finish(done, task);
    Py_DECREF(done);
    return rc;
}

/* The loop's tap when this factory's next task may be batched (a new reference), else NULL.
   The tap takes this factory's LeanDone when no batch is pending and the one it had has no
   task left to mark. */
static TapObject *
lf_batching_tap(LeanFactoryObject *self, PyObject *loop, speedups_state *st)
{
    if (!Py_IS_TYPE(self->lean_done, st->lean_done_type)
        || ((LeanDoneObject *)self->lean_done)->starts != self->starts) {
        return NULL;  /* a done callback that is not the LeanDone of this factory's table */
    }
    PyObject *found = PyObject_GetAttr(loop, st->s_call_soon);
    if (found == NULL) {
        PyErr_Clear();
        return NULL;
    }
    TapObject *tap = (TapObject *)found;
    if (!Py_IS_TYPE(found, st->tap_type) || tap->kept == NULL) {
        Py_DECREF(found);
        return NULL;
    }
    if (tap->done != self->lean_done) {
        PyObject *other = tap->done == NULL ? NULL : ((LeanDoneObject *)tap->done)->starts;
        if (tap->pending || (other != NULL && ((StartsObject *)other)->used)) {
            Py_DECREF(found);
            return NULL;
        }
        Py_XSETREF(tap->done, Py_NewRef(self->lean_done));
    }
    return tap;
}

/* Put task in the tap's pending batch: 1 done, 0 not (no check pending), -1 error. */
static int
tap_batch_add(TapObject *self, PyObject *task, PyObject *context)
{
    if (!self->pending) {
        return 0;
    }
    if ((PyObject *)Py_TYPE(task) != self->task_type) {
        if (self->task_type != NULL) {
            return 0;  /* the tap marks the ends of one task type's tasks (asyncio.Task's) */
        }
        self->task_type = Py_NewRef(Py_TYPE(task));
    }
    if (self->batch_len == self->batch_cap) {
        Py_ssize_t cap = self->batch_cap ? 2 * self->batch_cap : 64;
        PyObject **grown = PyMem_Realloc(self->batch, (size_t)cap * 2 * sizeof(PyObject *));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->batch = grown;
        self->batch_cap = cap;
    }
    self->batch[2 * self->batch_len] = Py_NewRef(task);
    self->batch[2 * self->batch_len + 1] = Py_NewRef(context);
    self->batch_len++;
    return 1;
}


/* ---------------------------------------------------------------------------------------
 * SpanHooks: the span sink's task_begin/task_end for the common task (see
 * _speedups_py.SpanHooks; the sink's own methods are the general path and the
 * specification). begin makes the task's span handle (an instance of the sink's _TaskSpan,
 * its __slots__ written directly), hidden from the cycle collector (it refers to nothing
 * that refers back to it), and sets it in TASK_SPAN; end hands the finished span to
 * the OTLP lane as a tuple and calls the exemplar hooks. Every other case goes, before
 * anything is done, to the sink's methods. Used only where the build has a GIL (the sink
 * does not make one on a free-threaded build): the counts below rely on it.
 * --------------------------------------------------------------------------------------- */

/* An int from a 128-bit value given as its two halves (new reference). */
static PyObject *
int_from_u128(unsigned long long high, unsigned long long low)
{
    unsigned char bytes[16];
    for (int i = 0; i < 8; i++) {
        bytes[i] = (unsigned char)(low >> (8 * i));
        bytes[8 + i] = (unsigned char)(high >> (8 * i));
    }
    return _PyLong_FromByteArray(bytes, 16, 1, 0);
}

/* The two halves of an int in [0, 2**128); -1 with an error naming the value otherwise. Its
   bytes read in one call (3.13's PyLong_AsNativeBytes; before, what PyLong_AsUnsignedLongLong
   calls), not a shift and two conversions. */
static int
int_to_u128(PyObject *value, const char *what, unsigned long long *high, unsigned long long *low)
{
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, got %R", what, value);
        return -1;
    }
    unsigned char bytes[16];
#if PY_VERSION_HEX >= 0x030D0000
    Py_ssize_t need = PyLong_AsNativeBytes(value, bytes, 16,
                                           Py_ASNATIVEBYTES_LITTLE_ENDIAN
                                               | Py_ASNATIVEBYTES_UNSIGNED_BUFFER
                                               | Py_ASNATIVEBYTES_REJECT_NEGATIVE);
    int bad = need < 0 || need > 16;
#else
    int bad = _PyLong_AsByteArray((PyLongObject *)value, bytes, 16, 1, 0) < 0;
#endif
    if (bad) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be an int in [0, 2**128), got %R", what, value);
        return -1;
    }
    *high = *low = 0;
    for (int i = 0; i < 8; i++) {
        *low |= (unsigned long long)bytes[i] << (8 * i);
        *high |= (unsigned long long)bytes[8 + i] << (8 * i);
    }
    return 0;
}

static PyObject *
si_get_trace_id(PyObject *op, void *closure)
{
    SpanIdsObject *self = (SpanIdsObject *)op;
    return int_from_u128(self->trace_high, self->trace_low);
}

/* value, to be written to SpanIds's field `name`: 0 if it may be (not a deletion, an int). */
static int
si_check(PyObject *value, const char *name)
{
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "SpanIds: %s cannot be deleted", name);
        return -1;
    }
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "SpanIds: %s must be an int, got %R", name, value);
        return -1;
    }
    return 0;
}

/* An error naming the value and the range of SpanIds's field `name`; -1. */
static int
si_out_of_range(PyObject *value, const char *name, const char *range)
{
    PyErr_Clear();
    PyErr_Format(PyExc_ValueError, "SpanIds: %s must be an int in %s, got %R", name, range,
                 value);
    return -1;
}

static int
si_set_trace_id(PyObject *op, PyObject *value, void *closure)
{
    SpanIdsObject *self = (SpanIdsObject *)op;
    unsigned long long high, low;
    if (si_check(value, "trace_id") < 0 ||
        int_to_u128(value, "SpanIds: trace_id", &high, &low) < 0) {
        return -1;
    }
    self->trace_high = high;
    self->trace_low = low;
    return 0;
}

static PyObject *
si_get_span_id(PyObject *op, void *closure)
{
    return PyLong_FromUnsignedLongLong(((SpanIdsObject *)op)->span_id);
}

static int
si_set_span_id(PyObject *op, PyObject *value, void *closure)
{
    if (si_check(value, "span_id") < 0) {
        return -1;
    }
    unsigned long long span_id = PyLong_AsUnsignedLongLong(value);
    if (span_id == (unsigned long long)-1 && PyErr_Occurred()) {
        return si_out_of_range(value, "span_id", "[0, 2**64)");
    }
    ((SpanIdsObject *)op)->span_id = span_id;
    return 0;
}

static PyObject *
si_get_created_ns(PyObject *op, void *closure)
{
    return PyLong_FromLongLong(((SpanIdsObject *)op)->created_ns);
}

static int
si_set_created_ns(PyObject *op, PyObject *value, void *closure)
{
    if (si_check(value, "created_ns") < 0) {
        return -1;
    }
    long long created = PyLong_AsLongLong(value);
    if (created == -1 && PyErr_Occurred()) {
        return si_out_of_range(value, "created_ns", "[-2**63, 2**63)");
    }
    ((SpanIdsObject *)op)->created_ns = created;
    return 0;
}

static PyGetSetDef si_getset[] = {
    {"trace_id", si_get_trace_id, si_set_trace_id, "The trace id (128 bits).", NULL},
    {"span_id", si_get_span_id, si_set_span_id, "The span id (64 bits).", NULL},
    {"created_ns", si_get_created_ns, si_set_created_ns,
     "The task's creation time (perf_counter_ns).", NULL},
    {NULL},
};

#define SI_MEMBER(n) {#n, T_OBJECT_EX, offsetof(SpanIdsObject, n), 0, NULL},
static PyMemberDef si_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(SpanIdsObject, weakreflist), READONLY},
    SPAN_IDS_FIELDS(SI_MEMBER)
    {NULL},
};
#undef SI_MEMBER

static void
si_dealloc(PyObject *op)
{
    PyTypeObject *type = Py_TYPE(op);
    if (((SpanIdsObject *)op)->weakreflist != NULL) {
        PyObject_ClearWeakRefs(op);
    }
#define SI_CLEAR(n) Py_CLEAR(IDS(op)->n);
    SPAN_IDS_FIELDS(SI_CLEAR)
#undef SI_CLEAR
    type->tp_free(op);
    Py_DECREF(type);
}

PyDoc_STRVAR(si_doc,
"SpanIds()\n--\n\n"
"A span handle's trace id, span id and creation time as native integers, and its object\n"
"fields: the base of the span sink's handle class (see _speedups_py.SpanIds). Each id\n"
"reads as an int, 0 till set.");

static PyType_Slot si_slots[] = {
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, si_dealloc},
    {Py_tp_getset, si_getset},
    {Py_tp_members, si_members},
    {Py_tp_doc, (void *)si_doc},
    {0, NULL},
};

static PyType_Spec si_spec = {
    .name = "asynctrace._speedups.SpanIds",
    .basicsize = sizeof(SpanIdsObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = si_slots,
};


/* ---------------------------------------------------------------------------------------
 * LaneQueue: the export thread's bounded queue of finished spans (see
 * _speedups_py.LaneQueue). Called with a span, it queues it, or counts it refused when it is
 * closed or `limit` spans wait already; when `batch` wait it calls wake() once (till the next
 * take). The span sink's end (SpanHooks) puts a task's span here with no Python call.
 * A ring of references; its state changes under the object's critical section (free-threaded
 * builds: several loops' threads put, the export thread takes); wake() is called outside it.
 * --------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject **items; /* the ring: items[(head + i) % cap] for i < len (owned references) */
    Py_ssize_t head, len, cap;
    Py_ssize_t limit, batch;
    PyObject *wake;
    long long handed;  /* spans queued so far */
    long long refused; /* spans refused: closed, or full */
    int signalled;     /* wake() called since the last take */
    int closed;
    vectorcallfunc vectorcall;
} LaneQueueObject;

/* Room for one more (len == cap < limit): a ring twice as large (at least 64), in order. */
static int
lq_grow(LaneQueueObject *self)
{
    Py_ssize_t cap = self->cap ? self->cap * 2 : 64;
    if (cap > self->limit) {
        cap = self->limit;
    }
    PyObject **items = PyMem_Malloc(sizeof(PyObject *) * (size_t)cap);
    if (items == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < self->len; i++) {
        items[i] = self->items[(self->head + i) % self->cap];
    }
    PyMem_Free(self->items);
    self->items = items;
    self->head = 0;
    self->cap = cap;
    return 0;
}

/* Queue item or refuse it (counted); 0, or -1 with an error (no memory, wake() raised). */
static int
lq_put(LaneQueueObject *self, PyObject *item)
{
    int rc = 0, wake = 0;
    Py_BEGIN_CRITICAL_SECTION(self);
    if (self->closed || self->len >= self->limit) {
        self->refused++;
    }
    else if (self->len == self->cap && lq_grow(self) < 0) {
        rc = -1;
    }
    else {
        self->items[(self->head + self->len) % self->cap] = Py_NewRef(item);
        self->len++;
        self->handed++;
        if (self->len >= self->batch && !self->signalled) {
            self->signalled = wake = 1;
        }
    }
    Py_END_CRITICAL_SECTION();
    if (wake) {
        PyObject *res = PyObject_CallNoArgs(self->wake);
        if (res == NULL) {
            return -1;
        }
        Py_DECREF(res);
    }
    return rc;
}

static PyObject *
lq_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_Format(PyExc_TypeError, "LaneQueue takes one span (%zd arguments given)", nargs);
        return NULL;
    }
    if (lq_put((LaneQueueObject *)op, args[0]) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* take(n): a list of the n oldest spans waiting (fewer if fewer wait), removed here. */
static PyObject *
lq_take(PyObject *op, PyObject *arg)
{
    LaneQueueObject *self = (LaneQueueObject *)op;
    if (!PyLong_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "LaneQueue.take: n must be an int, got %R", arg);
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "LaneQueue.take: n must be 0 or more, got %zd", n);
        return NULL;
    }
    PyObject *out = NULL;
    Py_BEGIN_CRITICAL_SECTION(self);
    Py_ssize_t k = n < self->len ? n : self->len;
    out = PyList_New(k);
    if (out != NULL) {
        for (Py_ssize_t i = 0; i < k; i++) { /* the references move to the list */
            PyList_SET_ITEM(out, i, self->items[(self->head + i) % self->cap]);
        }
        self->len -= k;
        self->head = self->len ? (self->head + k) % self->cap : 0;
        self->signalled = 0;
    }
    Py_END_CRITICAL_SECTION();
    return out;
}

/* Drop every waiting reference (the caller has removed them from the ring under the lock). */
static void
lq_release(PyObject **items, Py_ssize_t head, Py_ssize_t len, Py_ssize_t cap)
{
    for (Py_ssize_t i = 0; i < len; i++) {
        Py_DECREF(items[(head + i) % cap]);
    }
    PyMem_Free(items);
}

/* close(): refuse every span from now on; those waiting are let go (never taken). */
static PyObject *
lq_close(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    LaneQueueObject *self = (LaneQueueObject *)op;
    PyObject **items;
    Py_ssize_t head, len, cap;
    Py_BEGIN_CRITICAL_SECTION(self);
    self->closed = 1;
    items = self->items, head = self->head, len = self->len, cap = self->cap;
    self->items = NULL;
    self->head = self->len = self->cap = 0;
    Py_END_CRITICAL_SECTION();
    lq_release(items, head, len, cap);
    Py_RETURN_NONE;
}

static Py_ssize_t
lq_length(PyObject *op)
{
    LaneQueueObject *self = (LaneQueueObject *)op;
    Py_ssize_t len;
    Py_BEGIN_CRITICAL_SECTION(self);
    len = self->len;
    Py_END_CRITICAL_SECTION();
    return len;
}

static PyObject *
lq_get_count(PyObject *op, void *which)
{
    LaneQueueObject *self = (LaneQueueObject *)op;
    long long value;
    Py_BEGIN_CRITICAL_SECTION(self);
    value = which ? self->refused : self->handed;
    Py_END_CRITICAL_SECTION();
    return PyLong_FromLongLong(value);
}

static PyObject *
lq_get_closed(PyObject *op, void *Py_UNUSED(closure))
{
    LaneQueueObject *self = (LaneQueueObject *)op;
    int closed;
    Py_BEGIN_CRITICAL_SECTION(self);
    closed = self->closed;
    Py_END_CRITICAL_SECTION();
    return PyBool_FromLong(closed);
}

static PyObject *
lq_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"limit", "batch", "wake", NULL};
    PyObject *limit_obj, *batch_obj, *wake;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO:LaneQueue", keywords, &limit_obj,
                                     &batch_obj, &wake)) {
        return NULL;
    }
    PyObject *wrong = !PyLong_CheckExact(limit_obj) ? limit_obj
                    : !PyLong_CheckExact(batch_obj) ? batch_obj : NULL;
    if (wrong != NULL) {
        PyErr_Format(PyExc_TypeError, "LaneQueue: limit and batch must be ints, got %R", wrong);
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(limit_obj), batch = PyLong_AsSsize_t(batch_obj);
    if ((limit == -1 || batch == -1) && PyErr_Occurred()) {
        return NULL;
    }
    if (limit < 1 || batch < 1) {
        PyErr_Format(PyExc_ValueError,
                     "LaneQueue: limit and batch must be 1 or more, got limit=%zd, batch=%zd",
                     limit, batch);
        return NULL;
    }
    if (!PyCallable_Check(wake)) {
        PyErr_Format(PyExc_TypeError, "LaneQueue: wake must be callable, got %R", wake);
        return NULL;
    }
    LaneQueueObject *self = (LaneQueueObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->limit = limit;
    self->batch = batch;
    self->wake = Py_NewRef(wake);
    self->vectorcall = lq_vectorcall;
    return (PyObject *)self;
}

static int
lq_traverse(PyObject *op, visitproc visit, void *arg)
{
    LaneQueueObject *self = (LaneQueueObject *)op;
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(self->wake);
    for (Py_ssize_t i = 0; i < self->len; i++) {
        Py_VISIT(self->items[(self->head + i) % self->cap]);
    }
    return 0;
}

static int
lq_clear(PyObject *op)
{
    LaneQueueObject *self = (LaneQueueObject *)op;
    PyObject **items = self->items;
    Py_ssize_t head = self->head, len = self->len, cap = self->cap;
    self->items = NULL;
    self->head = self->len = self->cap = 0;
    Py_CLEAR(self->wake);
    lq_release(items, head, len, cap);
    return 0;
}

static void
lq_dealloc(PyObject *op)
{
    gc_heap_dealloc(op, lq_clear);
}

static PyMethodDef lq_methods[] = {
    {"take", lq_take, METH_O,
     "take(n) -> list: the n oldest spans waiting (fewer if fewer wait), removed."},
    {"close", lq_close, METH_NOARGS,
     "close(): refuse every span from now on (counted); those waiting are let go."},
    {NULL},
};

static PyGetSetDef lq_getset[] = {
    {"handed", lq_get_count, NULL, "Spans queued so far.", NULL},
    {"refused", lq_get_count, NULL, "Spans refused so far: closed, or limit waiting.",
     (void *)1},
    {"closed", lq_get_closed, NULL, "Whether close() was called.", NULL},
    {NULL},
};

static PyMemberDef lq_members[] = {
    {"limit", T_PYSSIZET, offsetof(LaneQueueObject, limit), READONLY, "Spans waiting at most."},
    {"batch", T_PYSSIZET, offsetof(LaneQueueObject, batch), READONLY,
     "Spans waiting when wake() is called."},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(LaneQueueObject, vectorcall), READONLY},
    {NULL},
};

PyDoc_STRVAR(lq_doc,
"LaneQueue(limit, batch, wake)\n--\n\n"
"The export thread's bounded queue of finished spans (see _speedups_py.LaneQueue): call it\n"
"with a span to queue it; take(n) removes the oldest.");

static PyType_Slot lq_slots[] = {
    {Py_tp_new, lq_new},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_traverse, lq_traverse},
    {Py_tp_clear, lq_clear},
    {Py_tp_dealloc, lq_dealloc},
    {Py_tp_methods, lq_methods},
    {Py_tp_getset, lq_getset},
    {Py_tp_members, lq_members},
    {Py_sq_length, lq_length},
    {Py_tp_doc, (void *)lq_doc},
    {0, NULL},
};

static PyType_Spec lq_spec = {
    .name = "asynctrace._speedups.LaneQueue",
    .basicsize = sizeof(LaneQueueObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL
             | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = lq_slots,
};
/* ---------------------------------------------------------------------------------------
 * SpanRecord: a common task span as SpanHooks hands it to LaneQueue lanes, in place of the
 * TaskSpan tuple (otlp_encode.TaskSpan) whose 15 items it reads as: its ids and times kept as
 * C values (no int made per span, none released by the export thread), its strings held.
 * Only the common span becomes one (no trace state, no priority hint, no exception: those
 * items are "", None, None, None); the C encoder writes it like the tuple, and it unpacks
 * as the tuple does (a sequence of those 15 items), so the Python encoder reads it too.
 * It holds only str, int and None: not tracked by the collector. Made only here.
 * --------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    unsigned long long trace_high, trace_low, span_id, parent_id;
    long long start, end; /* ns since the epoch */
    int remote;
    PyObject *name, *task_name, *outcome, *operation, *correlation_id;
} SpanRecordObject;

static void
sr_dealloc(PyObject *op)
{
    SpanRecordObject *self = (SpanRecordObject *)op;
    PyTypeObject *type = Py_TYPE(op);
    Py_XDECREF(self->name);
    Py_XDECREF(self->task_name);
    Py_XDECREF(self->outcome);
    Py_XDECREF(self->operation);
    Py_XDECREF(self->correlation_id);
    type->tp_free(op);
    Py_DECREF(type);
}

static Py_ssize_t
sr_length(PyObject *op)
{
    return 15;
}

/* The TaskSpan tuple's item i (new reference). */
static PyObject *
sr_item(PyObject *op, Py_ssize_t i)
{
    SpanRecordObject *self = (SpanRecordObject *)op;
    switch (i) {
    case 0: return int_from_u128(self->trace_high, self->trace_low);
    case 1: return PyLong_FromUnsignedLongLong(self->span_id);
    case 2: return PyLong_FromUnsignedLongLong(self->parent_id);
    case 3: return PyBool_FromLong(self->remote);
    case 4: return PyUnicode_FromString("");
    case 5: return Py_NewRef(self->name);
    case 6: return PyLong_FromLongLong(self->start);
    case 7: return PyLong_FromLongLong(self->end);
    case 8: return Py_NewRef(self->task_name);
    case 9: return Py_NewRef(self->outcome);
    case 10: return Py_NewRef(self->operation);
    case 11: return Py_NewRef(self->correlation_id);
    case 12: case 13: case 14: return Py_NewRef(Py_None);
    default:
        PyErr_SetString(PyExc_IndexError, "SpanRecord index out of range");
        return NULL;
    }
}

PyDoc_STRVAR(sr_doc,
"A common task span as the C span hooks hand it to a LaneQueue: the TaskSpan tuple's 15\n"
"items as a sequence (see asynctrace.export.otlp_encode.TaskSpan), its ids and times kept\n"
"in C. Made only by SpanHooks.");

static PyType_Slot sr_slots[] = {
    {Py_tp_dealloc, sr_dealloc},
    {Py_sq_length, sr_length},
    {Py_sq_item, sr_item},
    {Py_tp_doc, (void *)sr_doc},
    {0, NULL},
};

static PyType_Spec sr_spec = {
    .name = "asynctrace._speedups.SpanRecord",
    .basicsize = sizeof(SpanRecordObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = sr_slots,
};

/* Where a C task keeps its name or its coroutine (see sh_task_field): found once by looking
   for what get_name()/get_coro() returned among the task's pointers, then checked twice. */
typedef struct {
    Py_ssize_t offset; /* 0: not found yet, -1: never read (called instead) */
    int checks;        /* times found holding what the method returned (read after 2) */
    int misses;        /* tries that did not find exactly one place (gives up after 8) */
    int ints;          /* the name: an int n in the field was found to stand for "Task-n" */
} TaskField;

/* The span handle's object slots (sinks/tracing._TaskSpan). _rare is None for the common span:
   sampled, its trace state its parent's, no sampler attributes, links or late events. */
#define HANDLE_SLOTS(X) X(_context) X(_rare) X(correlation_id) X(inherited) X(parent)

#define SH_FIELDS(X) X(sink) X(handle_type) X(task_span) X(span_key) X(context_module)        \
    X(random_module) X(sampled) X(finished) X(internal) X(unnamed) X(provisional) X(state)     \
    X(on_error) X(lock) X(empty_args) X(n128) X(n64) X(task_prefix) X(empty_str)          \
    X(span_context_type) X(default_trace_state) X(runtime) X(checked) X(multi) X(adds)     \
    X(current_var) X(mt_draw) X(field_type)

typedef struct {
    PyObject_HEAD
#define SH_DECLARE(f) PyObject *f;
    SH_FIELDS(SH_DECLARE)
#undef SH_DECLARE
#define OFFSET_DECLARE(n) Py_ssize_t off_##n;
    HANDLE_SLOTS(OFFSET_DECLARE)
#undef OFFSET_DECLARE
    long long started; /* sampled spans begun here, and ended: summed by the sink at close */
    long long ended;
    long long epoch_offset;
    int common; /* the sink's state as sync() took it last: see _speedups_py.SpanHooks.sync */
    int closed;
    Slots state_slots; /* STATE.hooks */
    Slots hooks_slots; /* its exemplars */
    Slots meta_slots;  /* a TaskMetadata's (the type of the first metadata begin is given) */
    TaskField name_field; /* the C task's name and coroutine, read where it keeps them */
    TaskField coro_field;
} SpanHooksObject;

static const char *const SH_HOOKS_SLOTS[1] = {"exemplars"};

#define SLOT(obj, n) (*(PyObject **)((char *)(obj) + self->off_##n))

/* The offset of handle_type's __slots__ member `name` (an object slot), or -1 with an error. */
static Py_ssize_t
slot_offset(PyObject *handle_type, const char *name)
{
    PyObject *descr = PyObject_GetAttrString(handle_type, name);
    if (descr == NULL) {
        return -1;
    }
    Py_ssize_t offset = -1;
    if (Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type == T_OBJECT_EX && !(member->flags & READONLY)) {
            offset = member->offset;
        }
    }
    if (offset < 0) {
        PyErr_Format(PyExc_TypeError,
                     "SpanHooks: handle_type %R must have a __slots__ entry %s, got %R",
                     handle_type, name, descr);
    }
    Py_DECREF(descr);
    return offset;
}

/* ---------------------------------------------------------------------------------------
 * random's own generator, drawn from in place. The SDK's RandomIdGenerator draws a trace id
 * as random.getrandbits(128) and a span id as getrandbits(64): each call makes an int from a
 * temporary word array, which the span then reads back into C. When random.getrandbits is
 * still the module's bound method of a _random.Random (random._inst), the same words are
 * taken here from the same Mersenne Twister state, in the order getrandbits takes them
 * (least significant word first): the same stream, the same values, no int made. The layout
 * below is _random.Random's (Modules/_randommodule.c, unchanged from 3.2 to 3.14) and is not
 * a public one: it is only used after mt_check() has drawn a thousand values both ways from
 * two generators seeded alike and found them and the generators' states the same; otherwise
 * (and on a free-threaded build, where getrandbits takes the object's critical section and
 * SpanHooks is not used) getrandbits is called.
 * --------------------------------------------------------------------------------------- */

#define MT_N 624
#define MT_M 397

typedef struct {
    PyObject_HEAD
    int index;
    uint32_t state[MT_N];
} MTRandom;

/* _random.c's genrand_uint32. */
static uint32_t
mt_next(MTRandom *r)
{
    static const uint32_t mag01[2] = {0x0U, 0x9908b0dfU};
    uint32_t y, *mt = r->state;
    if (r->index >= MT_N) { /* generate MT_N words at one time */
        int kk;
        for (kk = 0; kk < MT_N - MT_M; kk++) {
            y = (mt[kk] & 0x80000000U) | (mt[kk + 1] & 0x7fffffffU);
            mt[kk] = mt[kk + MT_M] ^ (y >> 1) ^ mag01[y & 0x1U];
        }
        for (; kk < MT_N - 1; kk++) {
            y = (mt[kk] & 0x80000000U) | (mt[kk + 1] & 0x7fffffffU);
            mt[kk] = mt[kk + (MT_M - MT_N)] ^ (y >> 1) ^ mag01[y & 0x1U];
        }
        y = (mt[MT_N - 1] & 0x80000000U) | (mt[0] & 0x7fffffffU);
        mt[MT_N - 1] = mt[MT_M - 1] ^ (y >> 1) ^ mag01[y & 0x1U];
        r->index = 0;
    }
    y = mt[r->index++];
    y ^= (y >> 11);
    y ^= (y << 7) & 0x9d2c5680U;
    y ^= (y << 15) & 0xefc60000U;
    y ^= (y >> 18);
    return y;
}

/* getrandbits(64), as two words (the first the least significant). */
static unsigned long long
mt_next64(MTRandom *r)
{
    unsigned long long low = mt_next(r);
    return low | ((unsigned long long)mt_next(r) << 32);
}

/* The _random.Random type draw is bound to (a borrowed reference), or NULL: draw is not a C
   method of an object whose type derives from a _random.Random of the layout above. */
static PyTypeObject *
mt_base_of(PyObject *draw)
{
#ifdef Py_GIL_DISABLED
    (void)draw;
    return NULL;
#else
    if (!PyCFunction_Check(draw) || PyCFunction_GET_SELF(draw) == NULL) {
        return NULL;
    }
    for (PyTypeObject *t = Py_TYPE(PyCFunction_GET_SELF(draw)); t != NULL; t = t->tp_base) {
        if (strcmp(t->tp_name, "_random.Random") == 0) {
            return t->tp_basicsize == (Py_ssize_t)sizeof(MTRandom) ? t : NULL;
        }
    }
    return NULL;
#endif
}

/* 1 when draw (random.getrandbits) may be drawn from in place, 0 if not, -1 on error. Two
   generators of its base type seeded alike: one drawn from here, the other by its own
   getrandbits (the C function draw calls); a thousand 64-bit values and the states after
   must be the same. */
static int
mt_check(PyObject *draw)
{
    PyTypeObject *base = mt_base_of(draw);
    if (base == NULL) {
        return 0;
    }
    PyObject *here = PyObject_CallFunction((PyObject *)base, "i", 20261124);
    PyObject *there = here ? PyObject_CallFunction((PyObject *)base, "i", 20261124) : NULL;
    PyObject *theirs = there ? PyObject_GetAttrString(there, "getrandbits") : NULL;
    PyObject *bits = PyLong_FromLong(64);
    int same = theirs != NULL && bits != NULL && PyCFunction_Check(theirs) &&
               PyCFunction_GET_FUNCTION(theirs) == PyCFunction_GET_FUNCTION(draw);
    for (int i = 0; same > 0 && i < 1000; i++) { /* crosses a refill of the state */
        PyObject *value = PyObject_CallOneArg(theirs, bits);
        unsigned long long v = value ? PyLong_AsUnsignedLongLong(value) : 0;
        same = value == NULL || PyErr_Occurred() ? -1 : v == mt_next64((MTRandom *)here);
        Py_XDECREF(value);
    }
    if (same > 0) {
        PyObject *a = PyObject_CallMethod(here, "getstate", NULL);
        PyObject *b = a ? PyObject_CallMethod(there, "getstate", NULL) : NULL;
        same = b ? PyObject_RichCompareBool(a, b, Py_EQ) : -1;
        Py_XDECREF(a);
        Py_XDECREF(b);
    }
    Py_XDECREF(here);
    Py_XDECREF(there);
    Py_XDECREF(theirs);
    Py_XDECREF(bits);
    if (same < 0) {
        PyErr_Clear(); /* whatever failed, the ids are drawn by calling getrandbits */
        same = 0;
    }
    return same;
}

/* A random id as random.getrandbits(bits) draws it, never 0 (the SDK's RandomIdGenerator). */
static PyObject *
sh_random_id(PyObject *draw, PyObject *bits)
{
    PyObject *value;
    while ((value = PyObject_CallOneArg(draw, bits)) != NULL) {
        int nonzero = PyObject_IsTrue(value);
        if (nonzero != 0) {
            if (nonzero < 0) {
                Py_CLEAR(value);
            }
            break;
        }
        Py_DECREF(value);
    }
    return value;
}

/* A task span's ids as the SDK's RandomIdGenerator draws them from random.getrandbits: the
   trace id (128 bits, unless root is 0: then kept) and the span id (64), each drawn again
   while 0. In place when random.getrandbits is still the method mt_check() accepted. */
static int
sh_draw_ids(SpanHooksObject *self, int root, unsigned long long *trace_high,
            unsigned long long *trace_low, unsigned long long *span_id, speedups_state *st)
{
    PyObject *draw = module_attr(self->random_module, st->s_getrandbits);
    if (draw == NULL) {
        return -1;
    }
    if (draw == self->mt_draw) {
        MTRandom *r = (MTRandom *)PyCFunction_GET_SELF(draw);
        while (root) {
            *trace_low = mt_next64(r);
            *trace_high = mt_next64(r);
            root = (*trace_low | *trace_high) == 0;
        }
        do {
            *span_id = mt_next64(r);
        } while (*span_id == 0);
        Py_DECREF(draw);
        return 0;
    }
    int rc = 0;
    if (root) {
        PyObject *trace_id = sh_random_id(draw, self->n128);
        rc = trace_id == NULL ||
             int_to_u128(trace_id, "random.getrandbits(128)", trace_high, trace_low) < 0 ? -1 : 0;
        Py_XDECREF(trace_id);
    }
    PyObject *value = rc < 0 ? NULL : sh_random_id(draw, self->n64);
    if (value != NULL) {
        *span_id = PyLong_AsUnsignedLongLong(value);
        rc = (*span_id == (unsigned long long)-1 && PyErr_Occurred()) ? -1 : 0;
        Py_DECREF(value);
    }
    else {
        rc = -1;
    }
    Py_DECREF(draw);
    return rc;
}

/* The sink's state, taken afresh (the sink calls sync() whenever it changes it): 0, or -1 with
   an error (the state kept is the previous one). */
static int
sh_sync_state(SpanHooksObject *self, speedups_state *st)
{
    PyObject *runtime = PyObject_GetAttr(self->sink, st->s__runtime);
    PyObject *common = runtime ? PyObject_GetAttr(self->sink, st->s__common) : NULL;
    PyObject *checked = common ? PyObject_GetAttr(self->sink, st->s__checked_processors) : NULL;
    PyObject *closed = checked ? PyObject_GetAttr(self->sink, st->s__closed) : NULL;
    PyObject *lanes = closed ? PyObject_GetAttr(self->sink, st->s__lanes) : NULL;
    PyObject *tracer = lanes ? PyObject_GetAttr(self->sink, st->s__tracer) : NULL;
    PyObject *multi = NULL, *adds = NULL, *current_var = NULL;
    int is_common = -1, is_closed = -1;
    if (tracer != NULL && PyObject_GetOptionalAttr(tracer, st->s_span_processor, &multi) >= 0) {
        is_common = PyObject_IsTrue(common);
        is_closed = is_common < 0 ? -1 : PyObject_IsTrue(closed);
    }
    if (is_closed >= 0) {
        PyObject *seq = PySequence_Fast(lanes, "SpanHooks: sink._lanes must be a sequence");
        adds = seq ? PyTuple_New(PySequence_Fast_GET_SIZE(seq)) : NULL;
        for (Py_ssize_t i = 0; adds != NULL && i < PySequence_Fast_GET_SIZE(seq); i++) {
            PyObject *add = PyObject_GetAttr(PySequence_Fast_GET_ITEM(seq, i), st->s_add_task);
            if (add == NULL) {
                Py_CLEAR(adds);
                break;
            }
            PyTuple_SET_ITEM(adds, i, add);
        }
        Py_XDECREF(seq);
    }
    if (adds != NULL) {
        current_var = runtime == Py_None ? Py_NewRef(Py_None)
                                         : PyObject_GetAttr(runtime, st->s__current_context);
    }
    int rc = -1;
    if (current_var != NULL) {
        Py_XSETREF(self->current_var, Py_NewRef(current_var));
        Py_XSETREF(self->runtime, Py_NewRef(runtime));
        Py_XSETREF(self->checked, Py_NewRef(checked));
        Py_XSETREF(self->multi, multi != NULL ? Py_NewRef(multi) : Py_NewRef(Py_None));
        Py_XSETREF(self->adds, Py_NewRef(adds));
        self->common = is_common;
        self->closed = is_closed;
        rc = 0;
    }
    Py_XDECREF(runtime);
    Py_XDECREF(common);
    Py_XDECREF(checked);
    Py_XDECREF(closed);
    Py_XDECREF(lanes);
    Py_XDECREF(tracer);
    Py_XDECREF(multi);
    Py_XDECREF(adds);
    Py_XDECREF(current_var);
    return rc;
}

static PyObject *
sh_sync(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    SpanHooksObject *self = (SpanHooksObject *)op;
    if (sh_sync_state(self, PyType_GetModuleState(Py_TYPE(op))) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* 1 when begin may take the task (see _speedups_py.SpanHooks.begin), 0 if not, -1 on error. */
static int
sh_common(SpanHooksObject *self, speedups_state *st)
{
    if (!self->common || self->runtime == NULL || self->runtime == Py_None) {
        return 0;
    }
    PyObject *in_use = module_attr(self->context_module, st->s__RUNTIME_CONTEXT);
    if (in_use == NULL) {
        return -1;
    }
    Py_DECREF(in_use);
    if (in_use != self->runtime) {
        return 0;
    }
    PyObject *processors;
    if (PyObject_GetOptionalAttr(self->multi, st->s__span_processors, &processors) < 0) {
        return -1;
    }
    Py_XDECREF(processors);
    return (processors == NULL ? Py_None : processors) == self->checked;
}

/* A parent's SpanContext read as the tuple it is. opentelemetry-api's SpanContext is a tuple
   subclass, (trace_id, span_id, is_remote, trace_flags, trace_state, is_valid), whose
   properties return those items: a Python call each. Checked once here, on a SpanContext made
   for the purpose against its properties; where anything differs (another layout, no
   opentelemetry) span_context_type stays NULL and the properties are asked, as before. The
   default (empty) TraceState is known by identity; any other is asked whether it is empty. */
#define SC_SPAN_ID 1
#define SC_IS_REMOTE 2
#define SC_TRACE_STATE 4
static void
sh_probe_span_context(SpanHooksObject *self)
{
    PyObject *module = PyImport_ImportModule("opentelemetry.trace.span");
    PyObject *type = module ? PyObject_GetAttrString(module, "SpanContext") : NULL;
    PyObject *state = module ? PyObject_GetAttrString(module, "DEFAULT_TRACE_STATE") : NULL;
    Py_XDECREF(module);
    PyObject *probe = NULL;
    int ok = type != NULL && state != NULL && PyType_Check(type) &&
             PyType_IsSubtype((PyTypeObject *)type, &PyTuple_Type);
    if (ok) {
        PyObject *kw = Py_BuildValue("{sO}", "trace_state", state);
        PyObject *pos = Py_BuildValue("(KKO)", 7ULL, 9ULL, Py_True);
        probe = kw && pos ? PyObject_Call(type, pos, kw) : NULL;
        Py_XDECREF(kw);
        Py_XDECREF(pos);
        ok = probe != NULL && PyTuple_GET_SIZE(probe) == 6;
    }
    static const char *names[3] = {"span_id", "is_remote", "trace_state"};
    static const int items[3] = {SC_SPAN_ID, SC_IS_REMOTE, SC_TRACE_STATE};
    for (int i = 0; ok && i < 3; i++) {
        PyObject *value = PyObject_GetAttrString(probe, names[i]);
        ok = value != NULL && PyObject_RichCompareBool(value, PyTuple_GET_ITEM(probe, items[i]),
                                                       Py_EQ) == 1;
        Py_XDECREF(value);
    }
    ok = ok && PyTuple_GET_ITEM(probe, SC_TRACE_STATE) == state;
    Py_XDECREF(probe);
    PyErr_Clear(); /* no opentelemetry, or another layout: the properties are asked */
    if (ok) {
        self->span_context_type = type;
        self->default_trace_state = state;
        return;
    }
    Py_XDECREF(type);
    Py_XDECREF(state);
}

/* parent.<name> (new reference): the tuple item of a SpanContext known above, else asked. */
static PyObject *
sh_context_item(SpanHooksObject *self, PyObject *parent, int item, PyObject *name)
{
    if (self->span_context_type != NULL && (PyObject *)Py_TYPE(parent) == self->span_context_type
        && PyTuple_GET_SIZE(parent) == 6) {
        return Py_NewRef(PyTuple_GET_ITEM(parent, item));
    }
    return PyObject_GetAttr(parent, name);
}

static PyObject *
sh_fallback(SpanHooksObject *self, PyObject *name, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *call_args[6];
    call_args[0] = self->sink;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        call_args[i + 1] = args[i];
    }
    return PyObject_VectorcallMethod(name, call_args, (size_t)(nargs + 1), NULL);
}

/* The handle for a task whose parent is `creator`'s span (`parent`, its SpanContext) or none
   (parent NULL), set in TASK_SPAN and counted. */
static PyObject *
sh_new_handle(SpanHooksObject *self, PyObject *metadata_cid, long long created_ns,
              PyObject *current, PyObject *creator, PyObject *parent, speedups_state *st)
{
    unsigned long long trace_high = 0, trace_low = 0, span_value = 0;
    if (creator != NULL) { /* the parent's trace (parent is its SpanContext) */
        trace_high = IDS(creator)->trace_high;
        trace_low = IDS(creator)->trace_low;
    }
    int drawn = sh_draw_ids(self, creator == NULL, &trace_high, &trace_low, &span_value, st) == 0;
    PyTypeObject *type = (PyTypeObject *)self->handle_type;
    PyObject *handle = drawn ? type->tp_new(type, self->empty_args, NULL) : NULL;
    if (handle == NULL) {
        return NULL;
    }
    IDS(handle)->trace_high = trace_high;
    IDS(handle)->trace_low = trace_low;
    IDS(handle)->span_id = span_value;
    IDS(handle)->created_ns = created_ns;
    SLOT(handle, _context) = Py_NewRef(Py_None);
    SLOT(handle, _rare) = Py_NewRef(Py_None);
    SLOT(handle, correlation_id) = Py_NewRef(metadata_cid);
    SLOT(handle, inherited) = Py_NewRef(current);
    SLOT(handle, parent) = Py_NewRef(parent != NULL ? parent : Py_None);
    /* It refers to nothing that refers back to it (its current context, which does, is kept
       in the task's context, not in it), so the collector need not walk it: the sink's class
       has no GC header at all (see SpanIds); a subclass that added slots has one. */
    if (PyObject_IS_GC(handle)) {
        PyObject_GC_UnTrack(handle);
    }
    PyObject *token = PyContextVar_Set(self->task_span, handle);
    if (token == NULL) {
        Py_DECREF(handle);
        return NULL;
    }
    Py_DECREF(token);
    self->started++;
    int is_closed = self->closed;
    if (is_closed) { /* its installation closed as it started: it never ends there */
        PyObject *one = PyLong_FromLong(1);
        PyObject *res = one ? PyObject_CallMethodOneArg(self->sink, st->s__count_unfinished, one)
                            : NULL;
        Py_XDECREF(one);
        is_closed = res ? 0 : -1;
        Py_XDECREF(res);
    }
    if (is_closed < 0) {
        Py_DECREF(handle);
        return NULL;
    }
    return handle;
}

/* begin(metadata, created_ns) with the time as a C value (created: the same as an int, or NULL:
   made if the sink's own method is called). The factory calls it so when its begin hook is a
   SpanHooks' begin: no int made and read back, no method call. */
static PyObject *
sh_begin_ns(PyObject *op, PyObject *metadata, long long created_ns, PyObject *created)
{
    SpanHooksObject *self = (SpanHooksObject *)op;
    speedups_state *st = PyType_GetModuleState(Py_TYPE(op));
    PyObject *var = NULL, *current = NULL, *creator = NULL, *cid = NULL, *parent = NULL;
    PyObject *result = NULL;
    int common = sh_common(self, st);
    if (common <= 0) {
        goto other;
    }
    var = Py_XNewRef(self->current_var); /* the runtime's, as sync() took it */
    if (var == NULL || !PyContextVar_CheckExact(var)) {
        common = 0; /* cleared, or not a context variable: the sink's own method */
        goto other;
    }
    if (PyContextVar_Get(var, NULL, &current) < 0 || current == NULL ||
        PyContextVar_Get(self->task_span, NULL, &creator) < 0) {
        common = -1;
        goto other;
    }
    slots_probe_first(&self->meta_slots, metadata, METADATA_SLOTS, 3);
    cid = slots_get(&self->meta_slots, metadata, MD_CORRELATION, st->s_correlation_id);
    if (cid == NULL) {
        common = -1;
        goto other;
    }
    PyTypeObject *handle_type = (PyTypeObject *)self->handle_type;
    PyObject *here = NULL; /* the current span, a task's (borrowed), or NULL: no span */
    if (creator != NULL && Py_TYPE(creator) == handle_type &&
        SLOT(creator, inherited) == current) {
        here = creator; /* the creating task's, current as nothing was attached there */
    }
    else if (!PyDict_Check(current)) {
        common = 0;
        goto other;
    }
    else if (PyDict_GET_SIZE(current) != 0) { /* a task's made current when asked for? */
        here = PyDict_GetItemWithError(current, self->span_key);
        if (here == NULL || Py_TYPE(here) != handle_type) {
            /* another instrumentation's span, or a remote parent: the general path */
            common = here == NULL && PyErr_Occurred() ? -1 : 0;
            goto other;
        }
    }
    if (here != NULL) {
        PyObject *owner = SLOT(here, correlation_id);
        int same = owner == NULL ? 0 : PyObject_RichCompareBool(owner, cid, Py_EQ);
        if (same > 0 && SLOT(here, _rare) != Py_None) { /* sampled unless it says not */
            PyObject *flags = PyObject_GetAttr(here, st->s_trace_flags);
            same = flags == NULL ? -1 : flags == self->sampled;
            Py_XDECREF(flags);
        }
        if (same <= 0) {
            common = same < 0 ? -1 : 0; /* a new trace (linked), or not sampled */
            goto other;
        }
        /* get_span_context() keeps what it made in _context: taken from there once made */
        parent = SLOT(here, _context) != Py_None && SLOT(here, _context) != NULL
                     ? Py_NewRef(SLOT(here, _context))
                     : PyObject_CallMethodNoArgs(here, st->s_get_span_context);
        if (parent == NULL) {
            common = -1;
            goto other;
        }
    }
    result = sh_new_handle(self, cid, created_ns, current, here, parent, st);
    common = result ? 1 : -1;
other:
    Py_XDECREF(var);
    Py_XDECREF(current);
    Py_XDECREF(creator);
    Py_XDECREF(cid);
    Py_XDECREF(parent);
    if (common == 0) {
        PyObject *made = created ? Py_NewRef(created) : PyLong_FromLongLong(created_ns);
        PyObject *call_args[2] = {metadata, made};
        result = made ? sh_fallback(self, st->s_task_begin, call_args, 2) : NULL;
        Py_XDECREF(made);
    }
    return result;
}

/* begin(metadata, created_ns): see _speedups_py.SpanHooks.begin. */
static PyObject *
sh_begin(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "SpanHooks.begin takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    long long created_ns = PyLong_AsLongLong(args[1]);
    if (created_ns == -1 && PyErr_Occurred()) {
        return NULL;
    }
    return sh_begin_ns(op, args[0], created_ns, args[1]);
}

static int
is_default_task_name(SpanHooksObject *self, PyObject *name)
{
    if (PyLong_CheckExact(name)) {
        return 1; /* the number of the default name "Task-n", read where the task keeps it */
    }
    if (self->unnamed != Py_None && PyUnicode_Check(name) &&
        PyUnicode_Compare(name, self->unnamed) == 0) {
        return 1;
    }
    if (!PyUnicode_Check(name) || PyUnicode_GET_LENGTH(name) <= 5 ||
        PyUnicode_Tailmatch(name, self->task_prefix, 0, 5, -1) != 1) {
        return 0;
    }
    int kind = PyUnicode_KIND(name);
    const void *data = PyUnicode_DATA(name);
    for (Py_ssize_t i = 5; i < PyUnicode_GET_LENGTH(name); i++) {
        if (!Py_UNICODE_ISDIGIT(PyUnicode_READ(kind, data, i))) {
            return 0;
        }
    }
    return 1;
}

/* 1 when end may take the span (see _speedups_py.SpanHooks.end), 0 if not, -1 on error. */
static int
sh_lane_shape(SpanHooksObject *self, PyObject *entry, PyObject *outcome, PyObject *lanes,
              speedups_state *st)
{
    if (lanes == NULL || Py_TYPE(entry) != (PyTypeObject *)self->handle_type ||
        !PyTuple_Check(lanes) ||
        PyTuple_GET_SIZE(lanes) == 0) {
        return 0;
    }
    int finished = PyObject_RichCompareBool(outcome, self->finished, Py_EQ);
    if (finished <= 0) {
        return finished;
    }
    PyObject *parent = SLOT(entry, parent);
    if (SLOT(entry, _rare) != Py_None || parent == NULL) {
        return 0; /* anything uncommon: links, sampler attributes, late events, trace state */
    }
    if (parent == Py_None) {
        return 1;
    }
    /* the span's trace state: its parent's */
    PyObject *state = sh_context_item(self, parent, SC_TRACE_STATE, st->s_trace_state);
    int set = state == NULL ? -1
            : state == self->default_trace_state ? 0 : PyObject_IsTrue(state);
    Py_XDECREF(state);
    return set == 0 ? 1 : (set < 0 ? -1 : 0);
}

/* The span's name (new reference): operation, a name the user gave, else the coroutine's. */
static PyObject *
sh_span_name(SpanHooksObject *self, PyObject *operation, PyObject *task_name,
             PyObject *coro_name)
{
    if (operation != Py_None) {
        return Py_NewRef(operation);
    }
    if (!is_default_task_name(self, task_name)) {
        return Py_NewRef(task_name);
    }
    if (coro_name != NULL) {
        int set = PyObject_IsTrue(coro_name);
        if (set < 0) {
            return NULL;
        }
        if (set) {
            return Py_NewRef(coro_name);
        }
    }
    return Py_NewRef(self->provisional);
}

/* The lane's tuple for the span (otlp_encode.TaskSpan), and the exemplars' duration. */
static PyObject *
sh_lane_tuple(SpanHooksObject *self, PyObject *entry, PyObject *metadata, PyObject *outcome,
              long long finished_ns, PyObject *operation, PyObject *task_name, PyObject *name,
              PyObject *trace_id, PyObject *span_id, speedups_state *st)
{
    PyObject *parent = SLOT(entry, parent);
    PyObject *parent_id = NULL, *remote = NULL;
    if (parent == Py_None) {
        parent_id = PyLong_FromLong(0);
        remote = Py_NewRef(Py_False);
    }
    else {
        parent_id = sh_context_item(self, parent, SC_SPAN_ID, st->s_span_id);
        PyObject *is_remote =
            parent_id ? sh_context_item(self, parent, SC_IS_REMOTE, st->s_is_remote) : NULL;
        if (is_remote != NULL) {
            int r = PyObject_IsTrue(is_remote);
            remote = r < 0 ? NULL : Py_NewRef(r ? Py_True : Py_False);
            Py_DECREF(is_remote);
        }
    }
    PyObject *start = remote ? PyLong_FromLongLong(IDS(entry)->created_ns + self->epoch_offset)
                             : NULL;
    PyObject *end = start ? PyLong_FromLongLong(finished_ns + self->epoch_offset) : NULL;
    PyObject *cid = end ? slots_get(&self->meta_slots, metadata, MD_CORRELATION,
                                    st->s_correlation_id)
                        : NULL;
    PyObject *priority = cid ? slots_get(&self->meta_slots, metadata, MD_PRIORITY,
                                         st->s_priority_hint)
                             : NULL;
    PyObject *span = NULL;
    if (priority != NULL) {
        span = PyTuple_Pack(15, trace_id, span_id, parent_id, remote,
                            self->empty_str, name, start, end, task_name, outcome, operation, cid,
                            priority, Py_None, Py_None);
    }
    if (span != NULL) {
        PyObject_GC_UnTrack(span); /* ints, str, bool and None: in no cycle */
    }
    Py_XDECREF(parent_id);
    Py_XDECREF(remote);
    Py_XDECREF(start);
    Py_XDECREF(end);
    Py_XDECREF(cid);
    Py_XDECREF(priority);
    return span;
}

/* The lanes' SpanRecord for the span (new reference), or NULL with an error; Py_None when the
   span is not a common one after all (a priority hint: the tuple's). */
static PyObject *
sh_lane_record(SpanHooksObject *self, PyObject *entry, PyObject *metadata, PyObject *outcome,
               long long finished_ns, PyObject *operation, PyObject *task_name, PyObject *name,
               speedups_state *st)
{
    PyObject *priority = slots_get(&self->meta_slots, metadata, MD_PRIORITY, st->s_priority_hint);
    if (priority == NULL) {
        return NULL;
    }
    /* what the C encoder writes as it is (else the tuple: the Python encoder decides) */
    int common = priority == Py_None && PyUnicode_CheckExact(name) &&
                 PyUnicode_CheckExact(outcome) &&
                 (operation == Py_None || PyUnicode_CheckExact(operation)) &&
                 (PyUnicode_CheckExact(task_name) || PyLong_CheckExact(task_name));
    Py_DECREF(priority);
    if (!common) {
        return Py_NewRef(Py_None);
    }
    unsigned long long parent_id = 0;
    int remote = 0;
    PyObject *parent = SLOT(entry, parent);
    if (parent != Py_None) {
        PyObject *value = sh_context_item(self, parent, SC_SPAN_ID, st->s_span_id);
        parent_id = value ? PyLong_AsUnsignedLongLong(value) : 0;
        PyObject *is_remote = value && !PyErr_Occurred()
                                  ? sh_context_item(self, parent, SC_IS_REMOTE, st->s_is_remote)
                                  : NULL;
        Py_XDECREF(value);
        remote = is_remote ? PyObject_IsTrue(is_remote) : -1;
        Py_XDECREF(is_remote);
        if (remote < 0) {
            return NULL;
        }
    }
    PyObject *cid = slots_get(&self->meta_slots, metadata, MD_CORRELATION, st->s_correlation_id);
    if (cid == NULL) {
        return NULL;
    }
    if (cid != Py_None && !PyUnicode_CheckExact(cid)) {
        Py_DECREF(cid);
        return Py_NewRef(Py_None);
    }
    SpanRecordObject *record = PyObject_New(SpanRecordObject, st->span_record_type);
    if (record == NULL) {
        Py_DECREF(cid);
        return NULL;
    }
    record->trace_high = IDS(entry)->trace_high;
    record->trace_low = IDS(entry)->trace_low;
    record->span_id = IDS(entry)->span_id;
    record->parent_id = parent_id;
    record->remote = remote;
    record->start = IDS(entry)->created_ns + self->epoch_offset;
    record->end = finished_ns + self->epoch_offset;
    record->name = Py_NewRef(name);
    record->task_name = Py_NewRef(task_name);
    record->outcome = Py_NewRef(outcome);
    record->operation = Py_NewRef(operation);
    record->correlation_id = cid;
    return (PyObject *)record;
}

/* The metrics' exemplar hooks, each with (metadata, outcome, duration, trace id, span id): a
   Counts' exemplar given the ids as C values (no call, no int), any other hook called. */
static int
sh_exemplars(SpanHooksObject *self, PyObject *entry, PyObject *metadata, PyObject *outcome,
             long long finished_ns, speedups_state *st)
{
    PyObject *hooks = slots_get(&self->state_slots, self->state, 0, st->s_hooks);
    PyObject *exemplars = hooks ? slots_get(&self->hooks_slots, hooks, 0, st->s_exemplars) : NULL;
    Py_XDECREF(hooks);
    if (exemplars == NULL) {
        return -1;
    }
    if (!PyTuple_Check(exemplars) || PyTuple_GET_SIZE(exemplars) == 0) {
        Py_DECREF(exemplars);
        return 0;
    }
    const SpanIdsObject *ids = IDS(entry);
    long long duration_ns = finished_ns - ids->created_ns;
    PyObject *duration = NULL, *trace_id = NULL, *span_id = NULL;
    int rc = 0;
    for (Py_ssize_t i = 0; rc == 0 && i < PyTuple_GET_SIZE(exemplars); i++) {
        PyObject *hook = PyTuple_GET_ITEM(exemplars, i);
        PyObject *counts = PyCFunction_Check(hook) ? PyCFunction_GET_SELF(hook) : NULL;
        int failed;
        if (counts != NULL && Py_IS_TYPE(counts, st->counts_type) &&
            PyCFunction_GET_FUNCTION(hook) == (PyCFunction)(void (*)(void))counts_exemplar) {
            int o = counts_outcome((CountsObject *)counts, outcome);
            failed = o < 0 || counts_exemplar_ids((CountsObject *)counts, metadata, o,
                                                  duration_ns, ids->trace_high, ids->trace_low,
                                                  ids->span_id, st) < 0;
        }
        else {
            if (span_id == NULL) { /* another hook: the ints made once */
                duration = PyLong_FromLongLong(duration_ns);
                trace_id = duration ? int_from_u128(ids->trace_high, ids->trace_low) : NULL;
                span_id = trace_id ? PyLong_FromUnsignedLongLong(ids->span_id) : NULL;
                if (span_id == NULL) {
                    rc = -1;
                    break;
                }
            }
            PyObject *call_args[5] = {metadata, outcome, duration, trace_id, span_id};
            PyObject *res = PyObject_Vectorcall(hook, call_args, 5, NULL);
            failed = res == NULL;
            Py_XDECREF(res);
        }
        if (failed) { /* call_each's rule: on_error counts it, or raises it again */
            rc = hook_failed(self->on_error, hook);
        }
    }
    Py_XDECREF(duration);
    Py_XDECREF(trace_id);
    Py_XDECREF(span_id);
    Py_DECREF(exemplars);
    return rc;
}

/* ---------------------------------------------------------------------------------------
 * A task's name and coroutine read where the C task keeps them. task.get_name() on 3.13+
 * makes the default name "Task-n" from the number the task keeps until it is asked (bare
 * asyncio never asks), and both getters are method calls: together most of what a traced
 * eager task added. The C task's layout is private, so it is found, not assumed: for the
 * first tasks of the C type (_asyncio.Task, exactly), the getter is called and the one
 * pointer field of the task holding what it returned is its place; it is read directly
 * only after two more tasks found it there again (the name: for an int n there, only after
 * get_name() was seen to make "Task-n" from it). Anything else (another type, a place not
 * found in 8 tries, a value of another kind, a free-threaded build) calls the getter.
 * --------------------------------------------------------------------------------------- */

#define FIELD_CHECKS 2
#define FIELD_MISSES 8

/* The method's result (new reference), and the field's place found or checked with it. */
static PyObject *
sh_field_learn(SpanHooksObject *self, TaskField *field, PyObject *task, PyObject *method)
{
    PyObject *before = NULL;
    if (field->offset > 0) {
        before = Py_XNewRef(*(PyObject **)((char *)task + field->offset));
    }
    PyObject *got = PyObject_CallMethodNoArgs(task, method);
    if (got == NULL) {
        Py_XDECREF(before);
        return NULL;
    }
    if (field->offset == 0) { /* look for the one pointer field holding it */
        PyObject **fields = (PyObject **)task;
        Py_ssize_t n = Py_TYPE(task)->tp_basicsize / (Py_ssize_t)sizeof(PyObject *), at = 0;
        int found = 0;
        for (Py_ssize_t i = (Py_ssize_t)(sizeof(PyObject) / sizeof(PyObject *)); i < n; i++) {
            if (fields[i] == got) {
                at = i;
                found++;
            }
        }
        if (found == 1 && (self->field_type == NULL ||
                           self->field_type == (PyObject *)Py_TYPE(task))) {
            field->offset = at * (Py_ssize_t)sizeof(PyObject *);
            Py_XSETREF(self->field_type, Py_NewRef((PyObject *)Py_TYPE(task)));
        }
        else if (++field->misses >= FIELD_MISSES) {
            field->offset = -1;
        }
        return got;
    }
    /* a check: the field holds it now, and held it (or, for the name, the int it is made of) */
    PyObject *now = *(PyObject **)((char *)task + field->offset);
    int ok = now == got && before != NULL;
    if (ok && before != got) {
        ok = 0;
        if (field == &self->name_field && PyLong_CheckExact(before) && PyUnicode_Check(got)) {
            PyObject *made = PyUnicode_FromFormat("Task-%S", before);
            ok = made != NULL && PyUnicode_Compare(made, got) == 0;
            Py_XDECREF(made);
            PyErr_Clear();
            field->ints |= ok;
        }
    }
    Py_XDECREF(before);
    if (!ok) {
        field->offset = -1;
    }
    else if (field->checks < FIELD_CHECKS) {
        field->checks++;
    }
    return got;
}

/* task.get_name() or task.get_coro() (new reference), read at its field once known. For the
   name, ints: an int n may be returned for the default name "Task-n" (the lanes' encoder
   makes the str). */
static PyObject *
sh_task_field(SpanHooksObject *self, TaskField *field, PyObject *task, PyObject *method,
              int ints)
{
#ifndef Py_GIL_DISABLED
    if (field->offset > 0 && (PyObject *)Py_TYPE(task) == self->field_type) {
        PyObject *value = *(PyObject **)((char *)task + field->offset);
        if (field->checks >= FIELD_CHECKS && value != NULL) {
            if (field == &self->coro_field || PyUnicode_CheckExact(value)) {
                return Py_NewRef(value);
            }
            if (PyLong_CheckExact(value) && field->ints && ints) {
                return Py_NewRef(value);
            }
        }
        if (field->checks < FIELD_CHECKS ||
            (value != NULL && PyLong_CheckExact(value) && !field->ints)) {
            return sh_field_learn(self, field, task, method);
        }
    }
    else if (field->offset == 0 && is_c_task_type(Py_TYPE(task))) {
        return sh_field_learn(self, field, task, method);
    }
#endif
    return PyObject_CallMethodNoArgs(task, method);
}

/* Whether every lane's add_task is a LaneQueue (whose encoder takes a task number for a
   default task name). */
static int
sh_all_queues(PyObject *lanes, speedups_state *st)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(lanes); i++) {
        if (!Py_IS_TYPE(PyTuple_GET_ITEM(lanes, i), st->lane_queue_type)) {
            return 0;
        }
    }
    return 1;
}

/* end(task, entry, metadata, outcome, finished_ns) with the time as a C value (finished: the
   same as an int, or NULL: made if the sink's own method is called); LeanDone calls it so
   when its end hook is a SpanHooks' end. */
static PyObject *
sh_end_ns(PyObject *op, PyObject *task, PyObject *entry, PyObject *metadata, PyObject *outcome,
          long long finished_ns, PyObject *finished)
{
    SpanHooksObject *self = (SpanHooksObject *)op;
    speedups_state *st = PyType_GetModuleState(Py_TYPE(op));
    PyObject *lanes = Py_XNewRef(self->adds); /* the lanes' add_task, as sync() took them */
    PyObject *operation = NULL, *coro = NULL, *coro_name = NULL, *task_name = NULL;
    PyObject *name = NULL, *span = NULL, *trace_id = NULL, *span_id = NULL;
    int rc = sh_lane_shape(self, entry, outcome, lanes, st);
    if (rc <= 0) {
        goto other;
    }
    rc = -1;
    operation = slots_get(&self->meta_slots, metadata, MD_OPERATION, st->s_operation_name);
    if (operation == NULL) {
        goto other;
    }
    if (operation == Py_None) {
        coro = sh_task_field(self, &self->coro_field, task, st->s_get_coro, 0);
        if (coro == NULL || PyObject_GetOptionalAttr(coro, st->s___qualname__, &coro_name) < 0) {
            goto other;
        }
        if (coro_name != NULL && PyUnicode_Check(coro_name)) {
            int internal = PySet_Contains(self->internal, coro_name);
            if (internal != 0) {
                rc = internal < 0 ? -1 : 0; /* the loop's own task: not exported */
                goto other;
            }
        }
    }
    int queues = sh_all_queues(lanes, st); /* a SpanRecord for them, else the tuple */
    task_name = sh_task_field(self, &self->name_field, task, st->s_get_name, queues);
    name = task_name ? sh_span_name(self, operation, task_name, coro_name) : NULL;
    if (name != NULL && queues) {
        span = sh_lane_record(self, entry, metadata, outcome, finished_ns, operation, task_name,
                              name, st);
        if (span == Py_None) {
            Py_CLEAR(span);
        }
        else if (span == NULL) {
            goto other;
        }
    }
    if (name != NULL && span == NULL) {
        trace_id = int_from_u128(IDS(entry)->trace_high, IDS(entry)->trace_low);
        span_id = trace_id ? PyLong_FromUnsignedLongLong(IDS(entry)->span_id) : NULL;
        span = span_id ? sh_lane_tuple(self, entry, metadata, outcome, finished_ns, operation,
                                       task_name, name, trace_id, span_id, st)
                       : NULL;
    }
    if (span == NULL) {
        goto other;
    }
    self->ended++;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(lanes); i++) {
        /* a lane's add_task: its LaneQueue (put here, no Python call), or any callable */
        PyObject *add = PyTuple_GET_ITEM(lanes, i);
        PyObject *res = Py_IS_TYPE(add, st->lane_queue_type)
                          ? (lq_put((LaneQueueObject *)add, span) < 0 ? NULL : Py_NewRef(Py_None))
                          : PyObject_CallOneArg(add, span);
        if (res == NULL) {
            goto other;
        }
        Py_DECREF(res);
    }
    rc = sh_exemplars(self, entry, metadata, outcome, finished_ns, st) < 0
             ? -1 : 1;
other:
    Py_XDECREF(lanes);
    Py_XDECREF(operation);
    Py_XDECREF(coro);
    Py_XDECREF(coro_name);
    Py_XDECREF(task_name);
    Py_XDECREF(name);
    Py_XDECREF(trace_id);
    Py_XDECREF(span_id);
    Py_XDECREF(span);
    if (rc == 0) {
        PyObject *made = finished ? Py_NewRef(finished) : PyLong_FromLongLong(finished_ns);
        PyObject *call_args[5] = {task, entry, metadata, outcome, made};
        PyObject *result = made ? sh_fallback(self, st->s_task_end, call_args, 5) : NULL;
        Py_XDECREF(made);
        return result;
    }
    return rc < 0 ? NULL : Py_NewRef(Py_None);
}

/* end(task, entry, metadata, outcome, finished_ns): see _speedups_py.SpanHooks.end. */
static PyObject *
sh_end(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "SpanHooks.end takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    long long finished_ns = PyLong_AsLongLong(args[4]);
    if (finished_ns == -1 && PyErr_Occurred()) {
        return NULL;
    }
    return sh_end_ns(op, args[0], args[1], args[2], args[3], finished_ns, args[4]);
}

static PyObject *
sh_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"sink", "handle_type", "task_span", "context_module",
                               "random_module", "sampled", "finished", "internal", "unnamed",
                               "provisional", "state", "on_error", "span_key", NULL};
    PyObject *a[13];
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$OOOOOOOOOOOOO:SpanHooks", keywords, &a[0],
                                     &a[1], &a[2], &a[3], &a[4], &a[5], &a[6], &a[7], &a[8],
                                     &a[9], &a[10], &a[11], &a[12])) {
        return NULL;
    }
    speedups_state *st = PyType_GetModuleState(type);
    if (!PyType_Check(a[1]) || !PyType_IsSubtype((PyTypeObject *)a[1], st->span_ids_type)) {
        PyErr_Format(PyExc_TypeError,
                     "SpanHooks: handle_type must be a subclass of SpanIds, got %R", a[1]);
        return NULL;
    }
    if (!PyContextVar_CheckExact(a[2])) {
        PyErr_Format(PyExc_TypeError, "SpanHooks: task_span must be a ContextVar, got %R", a[2]);
        return NULL;
    }
    if (!PyFrozenSet_Check(a[7])) {
        PyErr_Format(PyExc_TypeError, "SpanHooks: internal must be a frozenset, got %R", a[7]);
        return NULL;
    }
    SpanHooksObject *self = (SpanHooksObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
#define OFFSET(n) if ((self->off_##n = slot_offset(a[1], #n)) < 0) goto error;
    HANDLE_SLOTS(OFFSET)
#undef OFFSET
    PyObject *offset = PyObject_GetAttrString(a[0], "_epoch_offset");
    if (offset == NULL) {
        goto error;
    }
    self->epoch_offset = PyLong_AsLongLong(offset);
    Py_DECREF(offset);
    if (self->epoch_offset == -1 && PyErr_Occurred()) {
        goto error;
    }
    PyObject **fields[13] = {&self->sink, &self->handle_type, &self->task_span,
                             &self->context_module, &self->random_module, &self->sampled,
                             &self->finished, &self->internal, &self->unnamed,
                             &self->provisional, &self->state, &self->on_error,
                             &self->span_key};
    for (int i = 0; i < 13; i++) {
        *fields[i] = Py_NewRef(a[i]);
    }
    PyObject *threading = PyImport_ImportModule("threading");
    self->lock = threading ? PyObject_CallMethod(threading, "Lock", NULL) : NULL;
    Py_XDECREF(threading);
    self->empty_args = PyTuple_New(0);
    self->n128 = PyLong_FromLong(128);
    self->n64 = PyLong_FromLong(64);
    self->task_prefix = PyUnicode_FromString("Task-");
    self->empty_str = PyUnicode_FromString("");
    if (!self->lock || !self->empty_args || !self->n128 || !self->n64 || !self->task_prefix ||
        !self->empty_str) {
        goto error;
    }
    sh_probe_span_context(self);
    self->mt_draw = module_attr(self->random_module, st->s_getrandbits);
    int in_place = self->mt_draw ? mt_check(self->mt_draw) : -1;
    if (in_place <= 0) {
        Py_CLEAR(self->mt_draw); /* not drawn from in place: getrandbits is called */
        if (in_place < 0) {
            goto error;
        }
    }
    slots_probe(&self->state_slots, (PyObject *)Py_TYPE(self->state), STATE_SLOTS, 1);
    slots_probe_attr(&self->hooks_slots, self->state, st->s_hooks, SH_HOOKS_SLOTS, 1);
    if (sh_sync_state(self, st) < 0) {
        goto error;
    }
    return (PyObject *)self;
error:
    Py_DECREF(self);
    return NULL;
}

static int
sh_traverse(PyObject *op, visitproc visit, void *arg)
{
    SpanHooksObject *self = (SpanHooksObject *)op;
    Py_VISIT(Py_TYPE(op));
#define SH_VISIT(f) Py_VISIT(self->f);
    SH_FIELDS(SH_VISIT)
#undef SH_VISIT
    Py_VISIT(self->state_slots.type);
    Py_VISIT(self->hooks_slots.type);
    Py_VISIT(self->meta_slots.type);
    return 0;
}

static int
sh_clear(PyObject *op)
{
    SpanHooksObject *self = (SpanHooksObject *)op;
#define SH_CLEAR(f) Py_CLEAR(self->f);
    SH_FIELDS(SH_CLEAR)
#undef SH_CLEAR
    Py_CLEAR(self->state_slots.type);
    Py_CLEAR(self->hooks_slots.type);
    Py_CLEAR(self->meta_slots.type);
    return 0;
}

static void
sh_dealloc(PyObject *op)
{
    gc_heap_dealloc(op, sh_clear);
}

static PyObject *
sh_get_reads(PyObject *op, void *closure)
{
    SpanHooksObject *self = (SpanHooksObject *)op;
    TaskField *name = &self->name_field, *coro = &self->coro_field;
    return Py_BuildValue("{sOsOsO}",
        "name", (name->offset > 0 && name->checks >= FIELD_CHECKS) ? Py_True : Py_False,
        "name_number", (name->offset > 0 && name->checks >= FIELD_CHECKS && name->ints)
                           ? Py_True : Py_False,
        "coro", (coro->offset > 0 && coro->checks >= FIELD_CHECKS) ? Py_True : Py_False);
}

static PyGetSetDef sh_getset[] = {
    {"reads_task_fields", sh_get_reads, NULL,
     "What is read where the C task keeps it (see sh_task_field): the name, a default name's "
     "number, the coroutine.", NULL},
    {NULL},
};

static PyMethodDef sh_methods[] = {
    {"begin", (PyCFunction)(void (*)(void))sh_begin, METH_FASTCALL,
     "begin(metadata, created_ns): the span sink's task_begin for the common task."},
    {"end", (PyCFunction)(void (*)(void))sh_end, METH_FASTCALL,
     "end(task, entry, metadata, outcome, finished_ns): the span sink's task_end likewise."},
    {"sync", sh_sync, METH_NOARGS,
     "sync(): take the sink's state afresh (the sink calls it whenever it changes it)."},
    {NULL},
};

static PyMemberDef sh_members[] = {
    {"instrument", T_OBJECT, offsetof(SpanHooksObject, sink), READONLY,
     "The span sink these hooks belong to."},
    {"started", T_LONGLONG, offsetof(SpanHooksObject, started), READONLY,
     "Sampled task spans begun here."},
    {"ended", T_LONGLONG, offsetof(SpanHooksObject, ended), READONLY,
     "Task spans ended here (handed to the lanes)."},
    {"lock", T_OBJECT, offsetof(SpanHooksObject, lock), READONLY,
     "Taken by the sink's close() as for a thread's counts (the GIL orders the counts)."},
    {"draws_in_place", T_OBJECT, offsetof(SpanHooksObject, mt_draw), READONLY,
     "The random.getrandbits whose generator ids are drawn from in place, or None."},
    {NULL},
};

PyDoc_STRVAR(sh_doc,
"SpanHooks(*, sink, handle_type, task_span, context_module, random_module, sampled,\n"
"          finished, internal, unnamed, provisional, state, on_error, span_key)\n--\n\n"
"The span sink's begin and end for the common task in C (see _speedups_py.SpanHooks).");

static PyType_Slot sh_slots[] = {
    {Py_tp_new, sh_new},
    {Py_tp_traverse, sh_traverse},
    {Py_tp_clear, sh_clear},
    {Py_tp_dealloc, sh_dealloc},
    {Py_tp_methods, sh_methods},
    {Py_tp_members, sh_members},
    {Py_tp_getset, sh_getset},
    {Py_tp_doc, (void *)sh_doc},
    {0, NULL},
};

static PyType_Spec sh_spec = {
    .name = "asynctrace._speedups.SpanHooks",
    .basicsize = sizeof(SpanHooksObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = sh_slots,
};


/* ---------------------------------------------------------------------------------------
 * encode_task_span(span): one OTLP Span message for a task span tuple, as
 * asynctrace/export/otlp_encode.py's encode_task_span writes it (its readable
 * specification; tests/test_lane.py checks both give the same bytes). Spans with an exception
 * event or a priority hint (rare, and more value types) return None: the Python encoder
 * writes those.
 * --------------------------------------------------------------------------------------- */

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buf;

static int
buf_reserve(Buf *b, Py_ssize_t more)
{
    if (b->len + more <= b->cap) {
        return 0;
    }
    Py_ssize_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more) {
        cap *= 2;
    }
    char *data = PyMem_Realloc(b->data, cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static int
buf_put(Buf *b, const void *src, Py_ssize_t n)
{
    if (buf_reserve(b, n) < 0) {
        return -1;
    }
    memcpy(b->data + b->len, src, n);
    b->len += n;
    return 0;
}

static int
varint_len(unsigned long long n)
{
    int i = 1;
    while (n >= 0x80) {
        n >>= 7;
        i++;
    }
    return i;
}

/* The writers below write at p, which has room (the span's bound is reserved first), and
   return where they stopped. */
static inline char *
w_varint(char *p, unsigned long long n)
{
    while (n >= 0x80) {
        *p++ = (char)((n & 0x7F) | 0x80);
        n >>= 7;
    }
    *p++ = (char)n;
    return p;
}

static inline char *
w_raw(char *p, const void *src, Py_ssize_t n)
{
    memcpy(p, src, (size_t)n);
    return p + n;
}

static inline char *
w_be64(char *p, unsigned long long v)
{
    for (int i = 0; i < 8; i++) {
        *p++ = (char)(v >> (8 * (7 - i)));
    }
    return p;
}

static inline char *
w_le(char *p, unsigned long long v, int n)
{
    for (int i = 0; i < n; i++) {
        *p++ = (char)(v >> (8 * i));
    }
    return p;
}

typedef struct {
    const char *p;
    Py_ssize_t n;
} Utf8;

/* A str's UTF-8 (kept by the str: no copy for ASCII); an empty one for None. */
static int
utf8_of(PyObject *value, Utf8 *out)
{
    out->p = "";
    out->n = 0;
    if (value == Py_None) {
        return 0;
    }
    out->p = PyUnicode_AsUTF8AndSize(value, &out->n);
    return out->p ? 0 : -1;
}

static inline char *
w_str_field(char *p, unsigned char tag, Utf8 s)
{
    *p++ = (char)tag;
    p = w_varint(p, (unsigned long long)s.n);
    return w_raw(p, s.p, s.n);
}

/* A Span attribute whose value is a string: 0x4a len KeyValue{key, AnyValue{string}}. At most
   44 bytes besides the key and the value. */
static inline char *
w_str_attr(char *p, const char *key, Py_ssize_t keylen, Utf8 v)
{
    Py_ssize_t any_len = 1 + varint_len(v.n) + v.n;
    Py_ssize_t kv_len = 1 + varint_len(keylen) + keylen + 1 + varint_len(any_len) + any_len;
    *p++ = 0x4a;
    p = w_varint(p, (unsigned long long)kv_len);
    *p++ = 0x0a;
    p = w_varint(p, (unsigned long long)keylen);
    p = w_raw(p, key, keylen);
    *p++ = 0x12;
    p = w_varint(p, (unsigned long long)any_len);
    *p++ = 0x0a;
    p = w_varint(p, (unsigned long long)v.n);
    return w_raw(p, v.p, v.n);
}

#define KEY(s) s, (Py_ssize_t)(sizeof(s) - 1)

/* 1 when C writes span (a TaskSpan tuple: see encode_task_span), 0 when the Python encoder
   must, -1 (TypeError) when it is not a 15-tuple. */
static int
encodable(PyObject *span, const char *who, speedups_state *st)
{
    if (Py_IS_TYPE(span, st->span_record_type)) {
        return 1;
    }
    if (!PyTuple_CheckExact(span) || PyTuple_GET_SIZE(span) != 15) {
        PyErr_Format(PyExc_TypeError, "%s: expected a 15-tuple, got %R", who, span);
        return -1;
    }
    PyObject **f = &PyTuple_GET_ITEM(span, 0);
    if (f[12] != Py_None || f[13] != Py_None) {
        return 0; /* a priority hint or an exception event: the Python encoder's */
    }
    for (int i = 0; i < 15; i++) {
        int is_int = (i <= 2 || i == 6 || i == 7);
        int is_str = (i == 4 || i == 5 || (i == 8 && !PyLong_CheckExact(f[8])) || i == 9);
        int is_opt_str = (i == 10 || i == 11 || i == 14);
        if ((is_int && !PyLong_CheckExact(f[i])) || (is_str && !PyUnicode_CheckExact(f[i]))
            || (is_opt_str && f[i] != Py_None && !PyUnicode_CheckExact(f[i]))) {
            return 0; /* an unusual value: the Python encoder decides */
        }
    }
    return 1;
}

/* A span's fields as the encoder writes them (borrowed strings). */
typedef struct {
    unsigned long long high, low, span_id, parent, start, end;
    int remote, has_operation, has_cid, has_error;
    Utf8 state, name, task_name, outcome, operation, cid, error;
    char numbered[32]; /* a default task name given as its number n: "Task-n" */
} SpanFields;

/* A task name: a str, or the number n of the default name "Task-n". */
static int
task_name_of(PyObject *value, SpanFields *f)
{
    if (!PyLong_CheckExact(value)) {
        return utf8_of(value, &f->task_name);
    }
    unsigned long long number = PyLong_AsUnsignedLongLong(value);
    if (number == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    f->task_name.p = f->numbered;
    f->task_name.n = snprintf(f->numbered, sizeof(f->numbered), "Task-%llu", number);
    return 0;
}

/* The fields of a TaskSpan tuple that encodable() accepted. */
static int
fields_of_tuple(PyObject *span, SpanFields *out)
{
    PyObject **f = &PyTuple_GET_ITEM(span, 0);
    if (int_to_u128(f[0], "encode_task_span: the trace id", &out->high, &out->low) < 0) {
        return -1;
    }
    out->span_id = PyLong_AsUnsignedLongLong(f[1]);
    out->parent = PyLong_AsUnsignedLongLong(f[2]);
    out->start = PyLong_AsUnsignedLongLong(f[6]);
    out->end = PyLong_AsUnsignedLongLong(f[7]);
    if (PyErr_Occurred()) {
        return -1;
    }
    if (task_name_of(f[8], out) < 0 || utf8_of(f[4], &out->state) < 0
        || utf8_of(f[5], &out->name) < 0 || utf8_of(f[9], &out->outcome) < 0
        || utf8_of(f[10], &out->operation) < 0 || utf8_of(f[11], &out->cid) < 0
        || utf8_of(f[14], &out->error) < 0) {
        return -1;
    }
    out->remote = PyObject_IsTrue(f[3]);
    out->has_operation = f[10] != Py_None;
    out->has_cid = f[11] != Py_None;
    out->has_error = f[14] != Py_None;
    return out->remote < 0 ? -1 : 0;
}

/* The fields of a SpanRecord: its C values as they are. */
static int
fields_of_record(PyObject *span, SpanFields *out)
{
    SpanRecordObject *r = (SpanRecordObject *)span;
    if (r->start < 0 || r->end < 0) { /* as PyLong_AsUnsignedLongLong refuses in the tuple */
        PyErr_Format(PyExc_OverflowError, "encode_task_span: a time before the epoch");
        return -1;
    }
    out->high = r->trace_high;
    out->low = r->trace_low;
    out->span_id = r->span_id;
    out->parent = r->parent_id;
    out->start = (unsigned long long)r->start;
    out->end = (unsigned long long)r->end;
    out->remote = r->remote;
    out->state.p = "";
    out->state.n = 0;
    out->error = out->state;
    out->has_operation = r->operation != Py_None;
    out->has_cid = r->correlation_id != Py_None;
    out->has_error = 0;
    if (task_name_of(r->task_name, out) < 0 || utf8_of(r->name, &out->name) < 0
        || utf8_of(r->outcome, &out->outcome) < 0 || utf8_of(r->operation, &out->operation) < 0
        || utf8_of(r->correlation_id, &out->cid) < 0) {
        return -1;
    }
    return 0;
}

/* One Span message (a ScopeSpans' field 2: 0x12, its length, the body) appended to out: its
   room reserved once (a bound: 512 bytes besides the strings), the body written after a
   two-byte length (moved where its length takes another size). span: a TaskSpan tuple or a
   SpanRecord that encodable() accepted. */
static int
buf_span(Buf *out, PyObject *span)
{
    SpanFields fields;
    if ((PyTuple_CheckExact(span) ? fields_of_tuple(span, &fields)
                                  : fields_of_record(span, &fields)) < 0) {
        return -1;
    }
    const SpanFields *F = &fields;
    Py_ssize_t bound = 512 + F->state.n + F->name.n + F->task_name.n + F->outcome.n
                       + F->operation.n + F->cid.n + F->error.n;
    if (buf_reserve(out, bound) < 0) {
        return -1;
    }
    char *at = out->data + out->len;
    char *body = at + 3, *p = body;
    p = w_raw(p, "\x0a\x10", 2); /* trace id: 16 bytes, big-endian */
    p = w_be64(p, F->high);
    p = w_be64(p, F->low);
    p = w_raw(p, "\x12\x08", 2);
    p = w_be64(p, F->span_id);
    if (F->state.n > 0) {
        p = w_str_field(p, 0x1a, F->state);
    }
    if (F->parent != 0) {
        p = w_raw(p, "\x22\x08", 2);
        p = w_be64(p, F->parent);
    }
    p = w_str_field(p, 0x2a, F->name);
    p = w_raw(p, "\x30\x01\x39", 3);
    p = w_le(p, F->start, 8);
    *p++ = 0x41;
    p = w_le(p, F->end, 8);
    p = w_str_attr(p, KEY("asyncio.task.name"), F->task_name);
    p = w_str_attr(p, KEY("asyncio.task.outcome"), F->outcome);
    if (F->has_operation) {
        p = w_str_attr(p, KEY("asynctrace.operation"), F->operation);
    }
    if (F->has_cid) {
        p = w_str_attr(p, KEY("asynctrace.correlation_id"), F->cid);
    }
    if (!F->has_error) {
        p = w_raw(p, "\x7a\x00", 2);
    }
    else {
        Py_ssize_t inner = 1 + varint_len(F->error.n) + F->error.n + 2;
        *p++ = 0x7a;
        p = w_varint(p, (unsigned long long)inner);
        p = w_str_field(p, 0x12, F->error);
        p = w_raw(p, "\x18\x02", 2);
    }
    unsigned int flags = 0x100 | ((F->remote && F->parent != 0) ? 0x200 : 0);
    p = w_raw(p, "\x85\x01", 2);
    p = w_le(p, flags, 4);
    Py_ssize_t n = p - body;
    int width = varint_len((unsigned long long)n);
    if (width != 2) {
        memmove(at + 1 + width, body, (size_t)n);
    }
    at[0] = 0x12;
    (void)w_varint(at + 1, (unsigned long long)n);
    out->len += 1 + width + n;
    return 0;
}

/* encode_task_spans(spans, fallback): the Span messages of a list of TaskSpan tuples, one
   after the other (a ScopeSpans' field 2 each), into one bytes object: each written here
   where encode_task_span would, else fallback(span) (the Python encoder) gives its bytes. A
   batch's spans cost no bytes object each, and are copied once. */
static PyObject *
speedups_encode_task_spans(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    speedups_state *st = get_state(module);
    PyObject *others = nargs == 3 && args[2] != Py_None ? args[2] : NULL;
    if (nargs < 2 || nargs > 3 || !PyList_CheckExact(args[0]) || !PyCallable_Check(args[1])
        || (others != NULL && !PyList_CheckExact(others))) {
        PyErr_SetString(PyExc_TypeError, "encode_task_spans(spans, fallback, others=None): a "
                        "list, a callable, and a list or None");
        return NULL;
    }
    /* a copy: the list may change meanwhile (the Python encoder, another thread) */
    PyObject *spans = PyList_AsTuple(args[0]), *fallback = args[1], *out = NULL;
    if (spans == NULL) {
        return NULL;
    }
    Buf all = {NULL, 0, 0};
    /* a common task span takes about 230 bytes: room for the batch at once, not doubled
       a dozen times */
    if (buf_reserve(&all, 256 * PyTuple_GET_SIZE(spans)) < 0) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(spans); i++) {
        PyObject *span = PyTuple_GET_ITEM(spans, i);
        if (others != NULL && !PyTuple_Check(span) && !Py_IS_TYPE(span, st->span_record_type)) {
            /* not a task span: the caller's */
            if (PyList_Append(others, span) < 0) {
                goto done;
            }
            continue;
        }
        int mine = encodable(span, "encode_task_spans", st);
        if (mine < 0) {
            goto done;
        }
        if (mine) {
            if (buf_span(&all, span) < 0) {
                goto done;
            }
            continue;
        }
        PyObject *data = PyObject_CallOneArg(fallback, span);
        if (data == NULL) {
            goto done;
        }
        if (!PyBytes_Check(data)) {
            PyErr_Format(PyExc_TypeError, "encode_task_spans: fallback gave %R, not bytes", data);
            Py_DECREF(data);
            goto done;
        }
        int put = buf_put(&all, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data));
        Py_DECREF(data);
        if (put < 0) {
            goto done;
        }
    }
    out = PyBytes_FromStringAndSize(all.data, all.len);
done:
    Py_DECREF(spans);
    PyMem_Free(all.data);
    return out;
}

static PyObject *
speedups_encode_task_span(PyObject *module, PyObject *span)
{
    int mine = encodable(span, "encode_task_span", get_state(module));
    if (mine <= 0) {
        if (mine < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    Buf one = {NULL, 0, 0};
    PyObject *out = buf_span(&one, span) < 0
                        ? NULL : PyBytes_FromStringAndSize(one.data, one.len);
    PyMem_Free(one.data);
    return out;
}

/* untracked_copy(cls): cls (a class whose one base is SpanIds, adding no slot) made again as
   a type whose instances have no GC header. A class statement always makes a type the cycle
   collector tracks (its instances can refer to their class); this one is built from a spec
   without Py_TPFLAGS_HAVE_GC, and cls's namespace (its methods, properties, __init__,
   __repr__...) copied into it. Its instances hold only SpanIds's fields, which refer to
   nothing that refers back to a handle (see sh_new_handle). */
static PyObject *
speedups_untracked_copy(PyObject *module, PyObject *cls)
{
    PyTypeObject *base = get_state(module)->span_ids_type;
    PyTypeObject *type = PyType_Check(cls) ? (PyTypeObject *)cls : NULL;
    if (type == NULL || type->tp_base != base || PyTuple_GET_SIZE(type->tp_bases) != 1
        || type->tp_basicsize != base->tp_basicsize || type->tp_dictoffset != 0
        || type->tp_itemsize != 0) {
        PyErr_Format(PyExc_TypeError,
                     "untracked_copy: cls must be a class whose one base is SpanIds and which "
                     "adds no slot (__slots__ = ()), got %R", cls);
        return NULL;
    }
    static PyType_Slot slots[] = {{0, NULL}};
    static PyType_Spec spec = {
        .name = "asynctrace._speedups.UntrackedHandle", /* renamed below as cls */
        .basicsize = 0,  /* SpanIds's */
        .flags = Py_TPFLAGS_DEFAULT,
        .slots = slots,
    };
    PyObject *copy = PyType_FromModuleAndSpec(module, &spec, (PyObject *)base);
    if (copy == NULL) {
        return NULL;
    }
    PyObject *ns = PyObject_GetAttrString(cls, "__dict__");
    PyObject *items = ns ? PyMapping_Items(ns) : NULL;
    Py_XDECREF(ns);
    if (items == NULL) {
        Py_DECREF(copy);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); i++) {
        PyObject *key = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
        PyObject *value = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 1);
        if (PyUnicode_Check(key)
            && (PyUnicode_CompareWithASCIIString(key, "__dict__") == 0
                || PyUnicode_CompareWithASCIIString(key, "__weakref__") == 0
                || PyUnicode_CompareWithASCIIString(key, "__slots__") == 0)) {
            continue;
        }
        if (PyObject_SetAttr(copy, key, value) < 0) {
            Py_DECREF(items);
            Py_DECREF(copy);
            return NULL;
        }
    }
    Py_DECREF(items);
    PyObject *name = PyObject_GetAttrString(cls, "__name__");
    PyObject *qualname = name ? PyObject_GetAttrString(cls, "__qualname__") : NULL;
    int rc = qualname ? PyObject_SetAttrString(copy, "__name__", name) : -1;
    rc = rc < 0 ? rc : PyObject_SetAttrString(copy, "__qualname__", qualname);
    Py_XDECREF(name);
    Py_XDECREF(qualname);
    if (rc < 0) {
        Py_DECREF(copy);
        return NULL;
    }
    return copy;
}

static PyMethodDef speedups_methods[] = {
    {"exporting", speedups_exporting, METH_O,
     "exporting(change) -> int | None: an export thread starts (1) or ends (-1) its work;\n"
     "while one is at work, loop threads hand it the GIL briefly now and then at a task's\n"
     "end. The threads at work now; None where there is no GIL to hand over."},
    {"untracked_copy", speedups_untracked_copy, METH_O,
     "untracked_copy(cls) -> type: cls (its one base SpanIds, no slot of its own) made again\n"
     "without the cycle collector's header (see _speedups_py.untracked_copy)."},
    {"encode_task_span", speedups_encode_task_span, METH_O,
     "encode_task_span(span) -> bytes, or None where the Python encoder must write it."},
    {"encode_task_spans", (PyCFunction)(void (*)(void))speedups_encode_task_spans, METH_FASTCALL,
     "encode_task_spans(spans, fallback, others=None) -> bytes: the Span messages of a list of\n"
     "task span tuples, each as encode_task_span writes it, or as fallback(span) does where it\n"
     "would not; with a list as others, what is not a tuple is appended there."},
    {NULL},
};

/* A tuple of n interned strings (new reference). */
static PyObject *
interned_tuple(Py_ssize_t n, const char *a, const char *b, const char *c, const char *d)
{
    const char *names[4] = {a, b, c, d};
    PyObject *tuple = PyTuple_New(n);
    for (Py_ssize_t i = 0; tuple != NULL && i < n; i++) {
        PyObject *name = PyUnicode_InternFromString(names[i]);
        if (name == NULL) {
            Py_CLEAR(tuple);
            break;
        }
        PyTuple_SET_ITEM(tuple, i, name);
    }
    return tuple;
}

static int
speedups_exec(PyObject *module)
{
    if (courtesy_watch_forks() < 0) {
        PyErr_SetString(PyExc_RuntimeError, "asynctrace._speedups: pthread_atfork failed");
        return -1;
    }
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
#define INTERN(n) if ((state->s_##n = PyUnicode_InternFromString(#n)) == NULL) return -1;
    STATE_STRINGS(INTERN)
#undef INTERN
    /* keyword names as vectorcall passes them: interned, so that the callee (Task's argument
       parser, the factory's lf_keyword) finds each by identity, not by comparing strings */
    state->kw_loop_context = interned_tuple(2, "loop", "context", NULL, NULL);
    state->kw_loop_context_name = interned_tuple(3, "loop", "context", "name", NULL);
    state->kw_eager = interned_tuple(3, "loop", "context", "eager_start", NULL);
    state->kw_eager_name = interned_tuple(4, "loop", "context", "name", "eager_start");
    state->kw_metadata = interned_tuple(3, "operation_name", "correlation_id", "priority_hint",
                                        NULL);
    state->kw_context = interned_tuple(1, "context", NULL, NULL, NULL);
    if (!state->kw_loop_context || !state->kw_loop_context_name || !state->kw_eager
        || !state->kw_eager_name || !state->kw_metadata || !state->kw_context) {
        return -1;
    }
    state->starts_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &starts_spec, NULL);
    if (state->starts_type == NULL || PyModule_AddType(module, state->starts_type) < 0) {
        return -1;
    }
    state->lean_factory_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &lf_spec, NULL);
    if (state->lean_factory_type == NULL) {
        return -1;
    }
    if (PyModule_AddType(module, state->lean_factory_type) < 0) {
        return -1;
    }
    state->counts_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &counts_spec, NULL);
    if (state->counts_type == NULL || PyModule_AddType(module, state->counts_type) < 0) {
        return -1;
    }
    state->lean_done_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &ld_spec, NULL);
    if (state->lean_done_type == NULL || PyModule_AddType(module, state->lean_done_type) < 0) {
        return -1;
    }
    state->span_ids_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &si_spec, NULL);
    if (state->span_ids_type == NULL || PyModule_AddType(module, state->span_ids_type) < 0) {
        return -1;
    }
    state->thread_slot_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &ts_spec, NULL);
    if (state->thread_slot_type == NULL
        || PyModule_AddType(module, state->thread_slot_type) < 0) {
        return -1;
    }
    state->lane_queue_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &lq_spec, NULL);
    if (state->lane_queue_type == NULL || PyModule_AddType(module, state->lane_queue_type) < 0) {
        return -1;
    }
    state->span_record_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &sr_spec, NULL);
    if (state->span_record_type == NULL
        || PyModule_AddType(module, state->span_record_type) < 0) {
        return -1;
    }
    state->create_task_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &ct_spec, NULL);
    if (state->create_task_type == NULL
        || PyModule_AddType(module, state->create_task_type) < 0) {
        return -1;
    }
    state->span_hooks_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &sh_spec, NULL);
    if (state->span_hooks_type == NULL || PyModule_AddType(module, state->span_hooks_type) < 0) {
        return -1;
    }
    if (PyModule_AddStringConstant(module, "IMPLEMENTATION", "c") < 0) {
        return -1;
    }
    PyObject *all = Py_BuildValue("[sssssssssssssss]", "Counts", "CreateTask", "IMPLEMENTATION",
                                  "LaneQueue",
                                  "LeanDone", "LeanFactory", "SpanHooks", "SpanIds", "Starts",
                                  "Tap", "ThreadSlot", "encode_task_span", "encode_task_spans",
                                  "exporting", "untracked_copy");
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
    Py_VISIT(state->lean_factory_type);
    Py_VISIT(state->counts_type);
    Py_VISIT(state->lean_done_type);
    Py_VISIT(state->span_hooks_type);
    Py_VISIT(state->span_ids_type);
    Py_VISIT(state->starts_type);
    Py_VISIT(state->lane_queue_type);
    Py_VISIT(state->span_record_type);
    Py_VISIT(state->create_task_type);
    Py_VISIT(state->thread_slot_type);
    return 0;
}

static int
speedups_clear(PyObject *module)
{
    speedups_state *state = get_state(module);
    Py_CLEAR(state->tap_type);
    Py_CLEAR(state->lean_factory_type);
    Py_CLEAR(state->counts_type);
    Py_CLEAR(state->lean_done_type);
    Py_CLEAR(state->span_hooks_type);
    Py_CLEAR(state->span_ids_type);
    Py_CLEAR(state->starts_type);
    Py_CLEAR(state->lane_queue_type);
    Py_CLEAR(state->span_record_type);
    Py_CLEAR(state->create_task_type);
    Py_CLEAR(state->thread_slot_type);
    Py_CLEAR(state->mark_name);
#define CLEAR_S(n) Py_CLEAR(state->s_##n);
    STATE_STRINGS(CLEAR_S)
#undef CLEAR_S
    Py_CLEAR(state->kw_loop_context);
    Py_CLEAR(state->kw_loop_context_name);
    Py_CLEAR(state->kw_eager);
    Py_CLEAR(state->kw_metadata);
    Py_CLEAR(state->kw_eager_name);
    Py_CLEAR(state->kw_context);
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
    .m_methods = speedups_methods,
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
