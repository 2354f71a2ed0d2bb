/* Flag-synchronized shared-memory allreduce among the ranks of one node.
 *
 * Every rank owns a segment of a node-shared MPI window laid out as
 *   [0, 8)                    uint64 sequence number of the small path, owner-written
 *   [8, 16)                   uint64 "gave up" flag, owner-written (see below)
 *   [16, 20)                  uint32 how many peers sleep waiting for the sequence number
 *   [64, 72)                  uint64 step counter of the pipeline, owner-written
 *   [80, 84)                  uint32 how many peers sleep waiting for the step counter
 *   [128, 128 + 2*slot)       two data slots of the small path
 *   [.., .. + NBUF*chunk)     the pipeline's ring of chunk buffers
 *
 * Small path (`allreduce`): a call copies the input into slot (seq & 1), publishes seq with release
 * semantics, waits until every peer has published seq (acquire), and reduces all
 * slots in rank order, so every rank computes bit-identical results. Two slots
 * make a trailing barrier unnecessary: a rank can only reuse a slot two calls
 * later, after every peer has published the call in between, which they do only
 * once they finished reading it. Everything that can fail is checked before the
 * sequence number is published, so an error never leaves peers half-way.
 *
 * Waiting spins for SPIN_NS, then sleeps on the counter (a futex on the shared page): ranks share
 * their core with their own compute (backward runs beside the engine thread that reduces the
 * finished buckets), and a spinning waiter took half that core from it until the peer came. A
 * counter's owner wakes the sleepers after publishing, only when some sleep (the waiter announces
 * itself, then looks at the counter again, so that a wake is never lost).
 *
 * No endless waits: a wait gives up when a peer has not arrived within the context's
 * timeout, or when the peer it waits for has given up itself; called from the main
 * thread, it lets Python handle signals every CHECK_NS (Ctrl-C, preemption handlers),
 * and an exception a handler raises ends the wait. A rank that gives up raises its
 * own "gave up" flag, so that its peers stop at once instead of timing out in turn,
 * and its context refuses every later call (its peers are left half-way).
 *
 * Loaded by hpc_train/comm/native.py, which compiles this file on first use.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#ifdef __linux__
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define HEADER 128
#define NBUF 4
#define SPIN_NS 20000LL               /* a wait spins this long, then sleeps until the counter moves */
#define SLEEP_NS 10000000LL           /* a sleep ends after this long at most, for the checks below */
#define SPINS_PER_CHECK 256           /* spins between looks at the clock and the peers' flags */
#define CHECK_NS 100000000LL          /* main thread: Python signal handlers run this often */

typedef struct {
    PyObject_HEAD
    char **segments; /* every rank's segment, mapped in this process */
    int rank, size;
    Py_ssize_t slot_bytes, chunk_bytes;
    uint64_t seq;    /* small path: calls so far */
    uint64_t step;   /* pipeline: barriers so far */
    uint64_t chunk;  /* pipeline: chunks so far (buffer = chunk % NBUF) */
    int64_t timeout_ns;         /* a wait gives up after this long (0: never) */
    unsigned long main_thread;  /* PyThread ident of the main thread: only it handles signals */
    int broken;                 /* a wait gave up: peers are half-way, no call may run */
} Context;

enum { WAIT_OK, WAIT_TIMEOUT, WAIT_PEER_GAVE_UP, WAIT_SIGNAL };

enum { OP_SUM, OP_PROD, OP_MAX, OP_MIN, OP_MEAN };

static inline volatile uint64_t *flag_of(Context *c, int q) { return (volatile uint64_t *)c->segments[q]; }
static inline volatile uint64_t *gave_up_of(Context *c, int q) { return (volatile uint64_t *)(c->segments[q] + 8); }
static inline volatile uint64_t *step_of(Context *c, int q) { return (volatile uint64_t *)(c->segments[q] + 64); }
/* The sleepers' count beside a counter (16 bytes on), and the counter's low 32 bits: the futex word. */
static inline volatile uint32_t *sleepers_of(volatile uint64_t *counter) {
    return (volatile uint32_t *)((volatile char *)counter + 16);
}
static inline uint32_t *futex_word(volatile uint64_t *counter) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return (uint32_t *)counter + 1;
#else
    return (uint32_t *)counter;
#endif
}

/* Set this rank's counter to `value` and wake whoever sleeps on it. The store and the load of the
 * sleepers' count are sequentially consistent, as are a waiter's announcement and its second look
 * at the counter: either the waiter sees the new value, or this sees the waiter. */
static void publish(volatile uint64_t *counter, uint64_t value) {
    __atomic_store_n(counter, value, __ATOMIC_SEQ_CST);
#ifdef __linux__
    if (__atomic_load_n(sleepers_of(counter), __ATOMIC_SEQ_CST))
        syscall(SYS_futex, futex_word(counter), FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
#endif
}

/* Sleep until the counter moves past `seen` (or SLEEP_NS passes); where there is no futex, yield. */
static void sleep_on(volatile uint64_t *counter, uint64_t seen, uint64_t value) {
#ifdef __linux__
    __atomic_fetch_add(sleepers_of(counter), 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(counter, __ATOMIC_SEQ_CST) < value) {
        struct timespec most = {0, SLEEP_NS};
        syscall(SYS_futex, futex_word(counter), FUTEX_WAIT, (uint32_t)seen, &most, NULL, 0);
    }
    __atomic_fetch_sub(sleepers_of(counter), 1, __ATOMIC_SEQ_CST);
#else
    (void)counter; (void)seen; (void)value;
    sched_yield();
#endif
}

static inline char *ring_of(Context *c, int q, uint64_t chunk) {
    return c->segments[q] + HEADER + 2 * c->slot_bytes + (Py_ssize_t)(chunk % NBUF) * c->chunk_bytes;
}
static inline char *slot_of(Context *c, int q, uint64_t seq) {
    return c->segments[q] + HEADER + (Py_ssize_t)(seq & 1) * c->slot_bytes;
}

#define REDUCE_LOOP(T)                                                                \
    static void reduce_##T(T *out, const T *in, Py_ssize_t n, int op) {               \
        Py_ssize_t i;                                                                 \
        switch (op) {                                                                 \
        case OP_SUM: case OP_MEAN: for (i = 0; i < n; i++) out[i] += in[i]; break;    \
        case OP_PROD: for (i = 0; i < n; i++) out[i] *= in[i]; break;                 \
        case OP_MAX: for (i = 0; i < n; i++) out[i] = in[i] > out[i] ? in[i] : out[i]; break; \
        case OP_MIN: for (i = 0; i < n; i++) out[i] = in[i] < out[i] ? in[i] : out[i]; break; \
        }                                                                             \
    }                                                                                 \
    static void divide_##T(T *out, Py_ssize_t n, int p) {                             \
        for (Py_ssize_t i = 0; i < n; i++) out[i] = (T)(out[i] / (T)p);               \
    }

REDUCE_LOOP(float)
REDUCE_LOOP(double)
REDUCE_LOOP(int8_t)
REDUCE_LOOP(uint8_t)
REDUCE_LOOP(int16_t)
REDUCE_LOOP(uint16_t)
REDUCE_LOOP(int32_t)
REDUCE_LOOP(uint32_t)
REDUCE_LOOP(int64_t)
REDUCE_LOOP(uint64_t)

typedef void (*reduce_fn)(void *, const void *, Py_ssize_t, int);
typedef void (*divide_fn)(void *, Py_ssize_t, int);

/* The element type of a buffer format, or -1 where we have no loop for it. */
static int type_index(const char *format, Py_ssize_t itemsize) {
    if (format == NULL) return -1;
    if (*format == '<' || *format == '=' || *format == '@') format++;
    if (format[0] == '\0' || format[1] != '\0') return -1;
    switch (format[0]) {
    case 'f': return itemsize == 4 ? 0 : -1;
    case 'd': return itemsize == 8 ? 1 : -1;
    case 'b': return 2;
    case 'B': return 3;
    case 'h': return 4;
    case 'H': return 5;
    case 'i': case 'l': case 'q':
        return itemsize == 4 ? 6 : itemsize == 8 ? 8 : -1;
    case 'I': case 'L': case 'Q':
        return itemsize == 4 ? 7 : itemsize == 8 ? 9 : -1;
    }
    return -1;
}

static const reduce_fn REDUCERS[] = {
    (reduce_fn)reduce_float, (reduce_fn)reduce_double, (reduce_fn)reduce_int8_t,
    (reduce_fn)reduce_uint8_t, (reduce_fn)reduce_int16_t, (reduce_fn)reduce_uint16_t,
    (reduce_fn)reduce_int32_t, (reduce_fn)reduce_uint32_t, (reduce_fn)reduce_int64_t,
    (reduce_fn)reduce_uint64_t};
static const divide_fn DIVIDERS[] = {
    (divide_fn)divide_float, (divide_fn)divide_double, (divide_fn)divide_int8_t,
    (divide_fn)divide_uint8_t, (divide_fn)divide_int16_t, (divide_fn)divide_uint16_t,
    (divide_fn)divide_int32_t, (divide_fn)divide_uint32_t, (divide_fn)divide_int64_t,
    (divide_fn)divide_uint64_t};

static inline int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Wait until every rank's counter (flag_of or step_of) has reached `value`; WAIT_OK, or why not.
 * Runs without the GIL; `save` is the thread state Py_BEGIN_ALLOW_THREADS saved, through which
 * the main thread takes the GIL back briefly to run signal handlers. */
static int wait_for_all(Context *c, volatile uint64_t *(*counter)(Context *, int), uint64_t value,
                        PyThreadState **save, int on_main) {
    const int64_t start = now_ns();
    int64_t next_signals = start + CHECK_NS;
    for (int q = 0; q < c->size; q++) {
        volatile uint64_t *peer = counter(c, q);
        long spins = 0;
        uint64_t seen;
        while ((seen = __atomic_load_n(peer, __ATOMIC_ACQUIRE)) < value) {
            if (++spins % SPINS_PER_CHECK) {
#if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
#endif
                continue;
            }
            if (__atomic_load_n(gave_up_of(c, q), __ATOMIC_ACQUIRE)) return WAIT_PEER_GAVE_UP;
            int64_t t = now_ns();
            if (t - start > SPIN_NS) {
                sleep_on(peer, seen, value);
                t = now_ns();
            }
            if (c->timeout_ns > 0 && t - start > c->timeout_ns) return WAIT_TIMEOUT;
            if (on_main && t >= next_signals) {
                PyEval_RestoreThread(*save);
                const int raised = PyErr_CheckSignals();
                *save = PyEval_SaveThread();
                if (raised < 0) return WAIT_SIGNAL;
                next_signals = t + CHECK_NS;
            }
        }
    }
    return WAIT_OK;
}

/* After a wait that gave up (GIL held): break the context, tell the peers, raise the error naming
 * the node ranks that had not arrived. A WAIT_SIGNAL keeps the handler's exception. */
static PyObject *give_up(Context *c, int why, volatile uint64_t *(*counter)(Context *, int), uint64_t value) {
    c->broken = 1;
    __atomic_store_n(gave_up_of(c, c->rank), 1, __ATOMIC_RELEASE);
    if (why == WAIT_SIGNAL) return NULL;
    PyObject *missing = PyList_New(0), *gave_up = PyList_New(0);
    if (missing == NULL || gave_up == NULL) {
        Py_XDECREF(missing);
        Py_XDECREF(gave_up);
        return NULL;
    }
    for (int q = 0; q < c->size; q++) {
        PyObject *rank = PyLong_FromLong(q);
        if (rank == NULL) break;
        if (__atomic_load_n(counter(c, q), __ATOMIC_ACQUIRE) < value) PyList_Append(missing, rank);
        if (q != c->rank && __atomic_load_n(gave_up_of(c, q), __ATOMIC_ACQUIRE)) PyList_Append(gave_up, rank);
        Py_DECREF(rank);
    }
    /* TimeoutError((kind, node ranks that had not arrived, node ranks that gave up)) */
    PyObject *what = Py_BuildValue("(sNN)", why == WAIT_TIMEOUT ? "timeout" : "peer gave up", missing, gave_up);
    if (what != NULL) {
        PyObject *args = PyTuple_Pack(1, what);
        if (args != NULL) PyErr_SetObject(PyExc_TimeoutError, args);
        Py_XDECREF(args);
        Py_DECREF(what);
    }
    return NULL;
}

static int usable(Context *c) {
    if (!c->broken) return 1;
    PyErr_SetString(PyExc_RuntimeError, "this node's shared-memory allreduce gave up on an earlier call "
                                        "(its peers are left half-way): no further call can run");
    return 0;
}

/* Parse (x, out, op) and acquire both buffers; on failure nothing is held and an error is set. */
static int acquire(PyObject *const *args, Py_ssize_t nargs, Py_buffer *in, Py_buffer *out, int *op,
                   int *type, Py_ssize_t max_bytes) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "expected (x, out, op)");
        return -1;
    }
    *op = (int)PyLong_AsLong(args[2]);
    if (*op < OP_SUM || *op > OP_MEAN) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "unknown op code");
        return -1;
    }
    if (PyObject_GetBuffer(args[0], in, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    if (PyObject_GetBuffer(args[1], out, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(in);
        return -1;
    }
    *type = type_index(in->format, in->itemsize);
    const char *problem = NULL;
    if (*type < 0 || *type != type_index(out->format, out->itemsize)) problem = "unsupported or different element types";
    else if (in->len != out->len) problem = "input and output sizes differ";
    else if (in->len > max_bytes) problem = "message larger than the flag slots";
    if (problem != NULL) {
        PyBuffer_Release(in);
        PyBuffer_Release(out);
        PyErr_SetString(PyExc_ValueError, problem);
        return -1;
    }
    return 0;
}

/* allreduce(x, out, op): out = reduction of every rank's x; out may be x. */
static PyObject *Context_allreduce(Context *c, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer in, out;
    int op, type, waited;
    if (!usable(c) || acquire(args, nargs, &in, &out, &op, &type, c->slot_bytes) < 0) return NULL;
    const int on_main = PyThread_get_thread_ident() == c->main_thread;
    uint64_t seq = ++c->seq;
    memcpy(slot_of(c, c->rank, seq), in.buf, (size_t)in.len);
    publish(flag_of(c, c->rank), seq);
    Py_ssize_t n = in.len / in.itemsize;
    Py_BEGIN_ALLOW_THREADS
    waited = wait_for_all(c, flag_of, seq, &_save, on_main);
    if (waited == WAIT_OK) {
        memcpy(out.buf, slot_of(c, 0, seq), (size_t)in.len);
        for (int q = 1; q < c->size; q++) REDUCERS[type](out.buf, slot_of(c, q, seq), n, op);
        if (op == OP_MEAN) DIVIDERS[type](out.buf, n, c->size);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    if (waited != WAIT_OK) return give_up(c, waited, flag_of, seq);
    Py_RETURN_NONE;
}

/* Slice q of a chunk of m elements split over p ranks (remainder on the first slices). */
static inline void slice_of(Py_ssize_t m, int p, int q, Py_ssize_t *offset, Py_ssize_t *count) {
    Py_ssize_t base = m / p, extra = m % p;
    *offset = q * base + (q < extra ? q : extra);
    *count = base + (q < extra ? 1 : 0);
}

/* pipeline(x, out, op): out = reduction of every rank's x, any size; out may be x.
 *
 * Chunks stream through a ring of NBUF buffers per rank. Step t publishes the
 * slices of chunk t that other ranks reduce, reduces this rank's own slice of
 * chunk t-1 (own data read from x, peers' from their buffers) into its buffer,
 * and copies every slice of chunk t-2 out from its owner's buffer. A counter
 * barrier follows every step but the last; a buffer is rewritten NBUF chunks
 * later, after at least one more barrier, so calls need no trailing barrier. */
static PyObject *Context_pipeline(Context *c, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer in, out;
    int op, type, waited = WAIT_OK;
    uint64_t step = 0;
    if (!usable(c) || acquire(args, nargs, &in, &out, &op, &type, PY_SSIZE_T_MAX) < 0) return NULL;
    const int on_main = PyThread_get_thread_ident() == c->main_thread;
    const Py_ssize_t size = in.itemsize, n = in.len / size, per = c->chunk_bytes / size;
    const Py_ssize_t nchunks = (n + per - 1) / per;
    const int p = c->size, r = c->rank;
    const char *x = in.buf;
    char *y = out.buf;
    const uint64_t base = c->chunk;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t t = 0; t < nchunks + 2; t++) {
        if (t < nchunks) {
            Py_ssize_t lo = t * per, m = (n - lo < per ? n - lo : per), off, cnt;
            char *mine = ring_of(c, r, base + t);
            for (int q = 0; q < p; q++) {
                if (q == r) continue;
                slice_of(m, p, q, &off, &cnt);
                memcpy(mine + off * size, x + (lo + off) * size, (size_t)(cnt * size));
            }
        }
        if (t >= 1 && t <= nchunks) {
            Py_ssize_t lo = (t - 1) * per, m = (n - lo < per ? n - lo : per), off, cnt;
            slice_of(m, p, r, &off, &cnt);
            char *target = ring_of(c, r, base + t - 1) + off * size;
            memcpy(target, x + (lo + off) * size, (size_t)(cnt * size));
            for (int k = 1; k < p; k++)
                REDUCERS[type](target, ring_of(c, (r + k) % p, base + t - 1) + off * size, cnt, op);
        }
        if (t >= 2) {
            Py_ssize_t lo = (t - 2) * per, m = (n - lo < per ? n - lo : per), off, cnt;
            for (int q = 0; q < p; q++) {
                slice_of(m, p, q, &off, &cnt);
                memcpy(y + (lo + off) * size, ring_of(c, q, base + t - 2) + off * size, (size_t)(cnt * size));
            }
        }
        if (t <= nchunks) {
            step = ++c->step;
            publish(step_of(c, r), step);
            waited = wait_for_all(c, step_of, step, &_save, on_main);
            if (waited != WAIT_OK) break;
        }
    }
    if (waited == WAIT_OK && op == OP_MEAN) DIVIDERS[type](y, n, p);
    Py_END_ALLOW_THREADS
    c->chunk += (uint64_t)nchunks;
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    if (waited != WAIT_OK) return give_up(c, waited, step_of, step);
    Py_RETURN_NONE;
}

static void Context_dealloc(Context *c) {
    PyMem_Free(c->segments);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyMethodDef Context_methods[] = {
    {"allreduce", (PyCFunction)(void (*)(void))Context_allreduce, METH_FASTCALL,
     "allreduce(x, out, op): out = reduction of every rank's x (op: 0 sum 1 prod 2 max 3 min 4 mean)"},
    {"pipeline", (PyCFunction)(void (*)(void))Context_pipeline, METH_FASTCALL,
     "pipeline(x, out, op): the same for any size, chunk by chunk through the ring buffers"},
    {NULL}};

static PyTypeObject ContextType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_flagshm.Context",
    .tp_basicsize = sizeof(Context),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Context_dealloc,
    .tp_methods = Context_methods,
};

/* context(addresses, rank, slot_bytes, chunk_bytes, timeout_s, main_thread): every rank's mapped
 * segment, of at least segment_bytes(slot_bytes, chunk_bytes) bytes; waits give up after
 * timeout_s (0: never); main_thread is threading.main_thread().ident. */
static PyObject *make_context(PyObject *self, PyObject *args) {
    PyObject *addresses;
    int rank;
    Py_ssize_t slot_bytes, chunk_bytes;
    double timeout_s;
    unsigned long main_thread;
    if (!PyArg_ParseTuple(args, "O!inndk", &PyList_Type, &addresses, &rank, &slot_bytes, &chunk_bytes, &timeout_s,
                          &main_thread))
        return NULL;
    Py_ssize_t size = PyList_GET_SIZE(addresses);
    if (rank < 0 || rank >= size || slot_bytes <= 0 || chunk_bytes < 64 || chunk_bytes % 64) {
        PyErr_SetString(PyExc_ValueError, "bad rank, slot size or chunk size");
        return NULL;
    }
    Context *c = PyObject_New(Context, &ContextType);
    if (c == NULL) return NULL;
    c->segments = PyMem_Calloc((size_t)size, sizeof(char *));
    if (c->segments == NULL) {
        Py_DECREF(c);
        return PyErr_NoMemory();
    }
    c->rank = rank;
    c->size = (int)size;
    c->slot_bytes = slot_bytes;
    c->chunk_bytes = chunk_bytes;
    c->chunk = 0;
    c->timeout_ns = timeout_s > 0 ? (int64_t)(timeout_s * 1e9) : 0;
    c->main_thread = main_thread;
    c->broken = 0;
    for (Py_ssize_t q = 0; q < size; q++) {
        c->segments[q] = (char *)PyLong_AsVoidPtr(PyList_GET_ITEM(addresses, q));
        if (PyErr_Occurred()) {
            Py_DECREF(c);
            return NULL;
        }
    }
    c->seq = *flag_of(c, rank); /* continue where this segment's owner left off */
    c->step = *step_of(c, rank);
    return (PyObject *)c;
}

static PyObject *segment_bytes(PyObject *self, PyObject *args) {
    Py_ssize_t slot_bytes, chunk_bytes;
    if (!PyArg_ParseTuple(args, "nn", &slot_bytes, &chunk_bytes)) return NULL;
    return PyLong_FromSsize_t(HEADER + 2 * slot_bytes + NBUF * chunk_bytes);
}

static PyMethodDef module_methods[] = {
    {"context", make_context, METH_VARARGS, "context(addresses, rank, slot_bytes, chunk_bytes) -> Context"},
    {"segment_bytes", segment_bytes, METH_VARARGS, "segment_bytes(slot_bytes, chunk_bytes) -> bytes per rank"},
    {NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_flagshm", NULL, -1, module_methods};

PyMODINIT_FUNC PyInit__flagshm(void) {
    if (PyType_Ready(&ContextType) < 0) return NULL;
    return PyModule_Create(&module);
}
