/* Asynchronous I/O at a queue depth for `hpc-train iobench`: fio's libaio, io_uring and posixaio engines.
 *
 * A queue (`open`) holds one job copy's kernel context and buffers; each `run` on it
 * takes a list of I/Os (file descriptor, offset, read or write, size), keeping up to
 * `depth` in flight as fio does: I/Os are staged, committed
 * to the kernel every `batch_submit` (io_submit, or io_uring_enter), and reaped when
 * the queue is full or nothing is left to stage, waiting for at least `complete_min`
 * (at least 1), taking at most `complete_max` a call (as fio: at least complete_min), and
 * going on while more than `depth_low` are in flight. libaio and io_uring
 * use raw system calls (<linux/aio_abi.h>, <linux/io_uring.h>): no libaio or liburing
 * to link; posixaio is glibc's aio_read/aio_write/aio_suspend (in libc since glibc 2.34). Every I/O gets three CLOCK_MONOTONIC stamps, as fio's: set up, issued (the
 * submit call returned), reaped. The GIL is released for the whole run.
 *
 * `data` holds either one block, written by every write (reads land in a scratch slot), or
 * one block per I/O (verify=): write i takes block i, read i delivers into block i.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <aio.h>
#include <errno.h>
#include <linux/aio_abi.h>
#include <linux/io_uring.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

typedef struct queue queue;
struct queue {
    int depth;
    size_t bs;
    char *buffers; /* depth blocks of bs, page-aligned (O_DIRECT) */
    /* libaio */
    aio_context_t ctx;
    struct iocb *iocbs;
    struct iocb **staged_cbs;
    struct io_event *events;
    /* io_uring */
    int ring;
    char *sq, *cq;
    size_t sq_len, cq_len, sqes_len;
    struct io_uring_sqe *sqes;
    struct io_uring_params params;
    unsigned sq_tail;
    /* posixaio */
    struct aiocb *aiocbs;
    int *staged_slots;
    char *busy; /* submitted, not yet reaped */
    /* all */
    int staged;
    int (*prep)(queue *, int slot, int fd, int reading, int64_t offset, size_t len);
    int (*commit)(queue *);                                          /* staged I/Os submitted, or -errno */
    int (*reap)(queue *, int min, int max, int *slots, int64_t *res); /* completions, or -errno */
};

/* ---- libaio ---------------------------------------------------------------------------- */

static int aio_prep(queue *q, int slot, int fd, int reading, int64_t offset, size_t len) {
    struct iocb *cb = &q->iocbs[slot];
    memset(cb, 0, sizeof *cb);
    cb->aio_lio_opcode = reading ? IOCB_CMD_PREAD : IOCB_CMD_PWRITE;
    cb->aio_fildes = (uint32_t)fd;
    cb->aio_buf = (uint64_t)(uintptr_t)(q->buffers + (size_t)slot * q->bs);
    cb->aio_nbytes = len;
    cb->aio_offset = offset;
    cb->aio_data = (uint64_t)slot;
    q->staged_cbs[q->staged++] = cb;
    return 0;
}

/* Submit every staged I/O, `submit_from(q, done)` taking those from `done` on, again where a
 * call takes only part or is interrupted; the count, or -errno. */
static int submit_staged(queue *q, long (*submit_from)(queue *, int)) {
    int done = 0;
    while (done < q->staged) {
        long r = submit_from(q, done);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        done += (int)r;
    }
    q->staged = 0;
    return done;
}

static long aio_submit_from(queue *q, int done) {
    return syscall(__NR_io_submit, q->ctx, (long)(q->staged - done), q->staged_cbs + done);
}

static int aio_commit(queue *q) { return submit_staged(q, aio_submit_from); }

static int aio_reap(queue *q, int min, int max, int *slots, int64_t *res) {
    for (;;) {
        long r = syscall(__NR_io_getevents, q->ctx, (long)min, (long)max, q->events, NULL);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        for (long i = 0; i < r; i++) {
            slots[i] = (int)q->events[i].data;
            res[i] = q->events[i].res;
        }
        return (int)r;
    }
}

static int aio_open(queue *q) {
    q->iocbs = calloc((size_t)q->depth, sizeof *q->iocbs);
    q->staged_cbs = calloc((size_t)q->depth, sizeof *q->staged_cbs);
    q->events = calloc((size_t)q->depth, sizeof *q->events);
    if (!q->iocbs || !q->staged_cbs || !q->events) return -ENOMEM;
    if (syscall(__NR_io_setup, q->depth, &q->ctx) < 0) return -errno;
    q->prep = aio_prep;
    q->commit = aio_commit;
    q->reap = aio_reap;
    return 0;
}

/* ---- posixaio (glibc's POSIX AIO: its own threads do the I/O) --------------------------- */

static int posix_prep(queue *q, int slot, int fd, int reading, int64_t offset, size_t len) {
    struct aiocb *cb = &q->aiocbs[slot];
    memset(cb, 0, sizeof *cb);
    cb->aio_fildes = fd;
    cb->aio_buf = q->buffers + (size_t)slot * q->bs;
    cb->aio_nbytes = len;
    cb->aio_offset = offset;
    cb->aio_lio_opcode = reading ? LIO_READ : LIO_WRITE;
    q->staged_slots[q->staged++] = slot;
    return 0;
}

static int posix_commit(queue *q) {
    int done = 0;
    for (int i = 0; i < q->staged; i++) {
        struct aiocb *cb = &q->aiocbs[q->staged_slots[i]];
        while ((cb->aio_lio_opcode == LIO_READ ? aio_read(cb) : aio_write(cb)) != 0) {
            if (errno != EAGAIN) return -errno;
        }
        q->busy[q->staged_slots[i]] = 1;
        done++;
    }
    q->staged = 0;
    return done;
}

static int posix_reap(queue *q, int min, int max, int *slots, int64_t *res) {
    const struct aiocb **waiting = malloc((size_t)q->depth * sizeof *waiting);
    if (!waiting) return -ENOMEM;
    int got = 0;
    for (;;) {
        int n = 0;
        for (int s = 0; s < q->depth && got < max; s++) {
            if (!q->busy[s]) continue;
            int e = aio_error(&q->aiocbs[s]);
            if (e == EINPROGRESS) {
                waiting[n++] = &q->aiocbs[s];
                continue;
            }
            ssize_t r = aio_return(&q->aiocbs[s]);
            q->busy[s] = 0;
            slots[got] = s;
            res[got++] = e ? -e : (int64_t)r;
        }
        if (got >= min || n == 0) break;
        if (aio_suspend(waiting, n, NULL) != 0 && errno != EINTR && errno != EAGAIN) {
            got = -errno;
            break;
        }
    }
    free(waiting);
    return got;
}

static int posix_open(queue *q) {
    q->aiocbs = calloc((size_t)q->depth, sizeof *q->aiocbs);
    q->staged_slots = calloc((size_t)q->depth, sizeof *q->staged_slots);
    q->busy = calloc((size_t)q->depth, 1);
    if (!q->aiocbs || !q->staged_slots || !q->busy) return -ENOMEM;
    q->prep = posix_prep;
    q->commit = posix_commit;
    q->reap = posix_reap;
    return 0;
}

/* ---- io_uring -------------------------------------------------------------------------- */

#define RING_U32(base, off) ((unsigned *)((base) + (off)))

static int uring_prep(queue *q, int slot, int fd, int reading, int64_t offset, size_t len) {
    unsigned index = q->sq_tail & *RING_U32(q->sq, q->params.sq_off.ring_mask);
    struct io_uring_sqe *e = &q->sqes[index];
    memset(e, 0, sizeof *e);
    e->opcode = reading ? IORING_OP_READ : IORING_OP_WRITE;
    e->fd = fd;
    e->addr = (uint64_t)(uintptr_t)(q->buffers + (size_t)slot * q->bs);
    e->len = (uint32_t)len;
    e->off = (uint64_t)offset;
    e->user_data = (uint64_t)slot;
    RING_U32(q->sq, q->params.sq_off.array)[index] = index;
    q->sq_tail++;
    q->staged++;
    return 0;
}

static long uring_submit_from(queue *q, int done) {
    return syscall(__NR_io_uring_enter, q->ring, (unsigned)(q->staged - done), 0u, 0u, NULL, 0);
}

static int uring_commit(queue *q) {
    __atomic_store_n(RING_U32(q->sq, q->params.sq_off.tail), q->sq_tail, __ATOMIC_RELEASE);
    return submit_staged(q, uring_submit_from);
}

static int uring_reap(queue *q, int min, int max, int *slots, int64_t *res) {
    unsigned *head = RING_U32(q->cq, q->params.cq_off.head);
    unsigned *tail = RING_U32(q->cq, q->params.cq_off.tail);
    unsigned mask = *RING_U32(q->cq, q->params.cq_off.ring_mask);
    struct io_uring_cqe *cqes = (struct io_uring_cqe *)(q->cq + q->params.cq_off.cqes);
    int got = 0;
    for (;;) {
        unsigned h = *head, t = __atomic_load_n(tail, __ATOMIC_ACQUIRE);
        while (h != t && got < max) {
            struct io_uring_cqe *c = &cqes[h & mask];
            slots[got] = (int)c->user_data;
            res[got] = c->res;
            got++;
            h++;
        }
        __atomic_store_n(head, h, __ATOMIC_RELEASE);
        if (got >= min) return got;
        long r = syscall(__NR_io_uring_enter, q->ring, 0u, (unsigned)(min - got), IORING_ENTER_GETEVENTS, NULL, 0);
        if (r < 0 && errno != EINTR) return -errno;
    }
}

static int uring_open(queue *q) {
    memset(&q->params, 0, sizeof q->params);
    q->ring = (int)syscall(__NR_io_uring_setup, (unsigned)q->depth, &q->params);
    if (q->ring < 0) return -errno;
    struct io_uring_params *p = &q->params;
    q->sq_len = p->sq_off.array + p->sq_entries * sizeof(unsigned);
    q->cq_len = p->cq_off.cqes + p->cq_entries * sizeof(struct io_uring_cqe);
    q->sqes_len = p->sq_entries * sizeof(struct io_uring_sqe);
    int rw = PROT_READ | PROT_WRITE, flags = MAP_SHARED | MAP_POPULATE;
    q->sq = mmap(NULL, q->sq_len, rw, flags, q->ring, IORING_OFF_SQ_RING);
    q->cq = mmap(NULL, q->cq_len, rw, flags, q->ring, IORING_OFF_CQ_RING);
    q->sqes = mmap(NULL, q->sqes_len, rw, flags, q->ring, IORING_OFF_SQES);
    if (q->sq == MAP_FAILED || q->cq == MAP_FAILED || q->sqes == MAP_FAILED) return -errno;
    q->sq_tail = *RING_U32(q->sq, p->sq_off.tail);
    q->prep = uring_prep;
    q->commit = uring_commit;
    q->reap = uring_reap;
    return 0;
}

/* ---- the run --------------------------------------------------------------------------- */

static void queue_close(queue *q) {
    if (q->ctx) syscall(__NR_io_destroy, q->ctx);
    free(q->iocbs);
    free(q->staged_cbs);
    free(q->events);
    if (q->sq && q->sq != MAP_FAILED) munmap(q->sq, q->sq_len);
    if (q->cq && q->cq != MAP_FAILED) munmap(q->cq, q->cq_len);
    if (q->sqes && (void *)q->sqes != MAP_FAILED) munmap(q->sqes, q->sqes_len);
    if (q->ring > 0) close(q->ring);
    free(q->aiocbs);
    free(q->staged_slots);
    free(q->busy);
    free(q->buffers);
}

typedef struct {
    const int32_t *fds; /* each I/O's file (a job copy may have several: nrfiles) */
    const int64_t *offsets;
    const uint8_t *reads;
    const int64_t *sizes; /* each I/O's length, at most the queue's bs */
    int64_t n, deadline_ns;
    int batch_submit, complete_min, complete_max, depth_low;
    int64_t *set_up, *issued, *reaped, *res;
    int64_t *submit_calls, *complete_calls; /* per call: how many I/Os it carried, as fio's histograms */
    int64_t n_submit_calls, n_complete_calls;
    int64_t *depth_at_commit;               /* in flight after each commit, one entry per I/O committed */
    char *data;                             /* with per_io: block i of I/O i (written from, read into) */
    int per_io;
} run_args;

/* Returns how many I/Os were issued (all of them reaped), or -errno. */
static int64_t run_queue(queue *q, run_args *a) {
    int depth = q->depth, inflight = 0;
    int *free_slots = malloc((size_t)depth * sizeof(int)), nfree = depth;
    int64_t *slot_index = malloc((size_t)depth * sizeof(int64_t));
    int *got_slots = malloc((size_t)depth * sizeof(int));
    int64_t *got_res = malloc((size_t)depth * sizeof(int64_t));
    int64_t *staged_index = malloc((size_t)depth * sizeof(int64_t));
    int64_t next = 0, status = 0;
    if (!free_slots || !slot_index || !got_slots || !got_res || !staged_index) {
        status = -ENOMEM;
        goto out;
    }
    for (int s = 0; s < depth; s++) free_slots[s] = depth - 1 - s;
    int stopped = 0;
    while ((next < a->n && !stopped) || inflight > 0 || q->staged > 0) {
        /* stage while there is room, committing every batch_submit */
        while (next < a->n && !stopped && nfree > 0) {
            int64_t t = now_ns();
            if (a->deadline_ns && t >= a->deadline_ns) {
                stopped = 1;
                break;
            }
            int slot = free_slots[--nfree];
            slot_index[slot] = next;
            a->set_up[next] = t;
            staged_index[q->staged] = next;
            if (a->per_io && !a->reads[next])
                memcpy(q->buffers + (size_t)slot * q->bs, a->data + (size_t)next * q->bs, (size_t)a->sizes[next]);
            q->prep(q, slot, a->fds[next], a->reads[next], a->offsets[next], (size_t)a->sizes[next]);
            next++;
            if (q->staged >= a->batch_submit) break;
        }
        if (q->staged > 0) {
            int staged = q->staged;
            int r = q->commit(q);
            if (r < 0) {
                status = r;
                goto drain;
            }
            int64_t t = now_ns();
            inflight += staged;
            for (int i = 0; i < staged; i++) {
                a->issued[staged_index[i]] = t;
                a->depth_at_commit[staged_index[i]] = inflight;
            }
            a->submit_calls[a->n_submit_calls++] = staged;
            if (nfree > 0 && next < a->n && !stopped) continue; /* room left: stage more first */
        }
        /* reap: the queue is full, or nothing is left to stage */
        do {
            if (inflight == 0) break;
            int min = a->complete_min < 1 ? 1 : a->complete_min;
            if (min > inflight) min = inflight;
            int max = a->complete_max < min ? min : a->complete_max;
            if (max > inflight) max = inflight;
            int got = q->reap(q, min, max, got_slots, got_res);
            if (got < 0) {
                status = got;
                goto drain;
            }
            int64_t t = now_ns();
            for (int i = 0; i < got; i++) {
                int slot = got_slots[i];
                int64_t index = slot_index[slot];
                a->reaped[index] = t;
                a->res[index] = got_res[i];
                if (a->per_io && a->reads[index])
                    memcpy(a->data + (size_t)index * q->bs, q->buffers + (size_t)slot * q->bs, (size_t)a->sizes[index]);
                free_slots[nfree++] = slot;
            }
            inflight -= got;
            a->complete_calls[a->n_complete_calls++] = got;
        } while (inflight > a->depth_low);
    }
    status = next;
    goto out;
drain: /* an error: wait for what is in flight, so no buffer is freed under the kernel */
    while (inflight > 0) {
        int got = q->reap(q, 1, inflight, got_slots, got_res);
        if (got < 0) break;
        inflight -= got;
    }
out:
    free(free_slots);
    free(slot_index);
    free(got_slots);
    free(got_res);
    free(staged_index);
    return status;
}

static int writable_int64(Py_buffer *b, Py_ssize_t n, const char *name) {
    if (b->len < n * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_Format(PyExc_ValueError, "%s: room for %zd int64 values needed", name, n);
        return 0;
    }
    return 1;
}

#define CAPSULE "hpc_train.io._aio.queue"

typedef struct {
    queue *q; /* NULL once closed */
} handle;

static void handle_close(handle *h) {
    if (h->q) {
        queue_close(h->q);
        free(h->q);
        h->q = NULL;
    }
}

static void handle_free(PyObject *capsule) {
    handle *h = PyCapsule_GetPointer(capsule, CAPSULE);
    if (h) {
        handle_close(h);
        free(h);
    }
}

/* open(engine, depth, bs) -> queue: the kernel context and depth buffers of one job copy,
 * set up once (io_destroy waits for an RCU grace period: milliseconds, too slow per run). */
static PyObject *open_queue(PyObject *self, PyObject *args) {
    const char *engine;
    int depth;
    Py_ssize_t bs;
    if (!PyArg_ParseTuple(args, "sin", &engine, &depth, &bs)) return NULL;
    if (depth < 1 || bs < 1) {
        PyErr_SetString(PyExc_ValueError, "aio.open: depth and bs must be positive");
        return NULL;
    }
    int (*open_engine)(queue *) = strcmp(engine, "libaio") == 0     ? aio_open
                                  : strcmp(engine, "io_uring") == 0 ? uring_open
                                  : strcmp(engine, "posixaio") == 0 ? posix_open
                                                                    : NULL;
    if (!open_engine) {
        PyErr_Format(PyExc_ValueError, "aio.open: unknown engine %s", engine);
        return NULL;
    }
    queue *q = calloc(1, sizeof *q);
    handle *h = malloc(sizeof *h);
    if (!q || !h) {
        free(q);
        free(h);
        return PyErr_NoMemory();
    }
    h->q = q;
    q->ring = -1;
    q->depth = depth;
    q->bs = (size_t)bs;
    int err = posix_memalign((void **)&q->buffers, 4096, (size_t)depth * (size_t)bs) ? -ENOMEM : 0;
    if (!err) err = open_engine(q);
    if (err) {
        handle_close(h);
        free(h);
        errno = -err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *capsule = PyCapsule_New(h, CAPSULE, handle_free);
    if (!capsule) {
        handle_close(h);
        free(h);
    }
    return capsule;
}

static PyObject *close_queue(PyObject *self, PyObject *args) {
    PyObject *capsule;
    if (!PyArg_ParseTuple(args, "O", &capsule)) return NULL;
    handle *h = PyCapsule_GetPointer(capsule, CAPSULE);
    if (!h) return NULL;
    handle_close(h);
    Py_RETURN_NONE;
}

static PyObject *run(PyObject *self, PyObject *args) {
    PyObject *capsule;
    int batch_submit, complete_min, complete_max, depth_low;
    long long deadline_ns;
    Py_buffer fds, offsets, reads, sizes, data, set_up, issued, reaped, res, submit_calls, complete_calls, depth_at_commit;
    if (!PyArg_ParseTuple(args, "Oy*y*y*y*w*iiiiLw*w*w*w*w*w*w*", &capsule, &fds, &offsets, &reads, &sizes, &data,
                          &batch_submit,
                          &complete_min, &complete_max, &depth_low, &deadline_ns, &set_up, &issued, &reaped, &res,
                          &submit_calls, &complete_calls, &depth_at_commit))
        return NULL;
    PyObject *result = NULL;
    handle *h = PyCapsule_GetPointer(capsule, CAPSULE);
    queue *q = h ? h->q : NULL;
    Py_ssize_t n = offsets.len / (Py_ssize_t)sizeof(int64_t), bs = (Py_ssize_t)(q ? q->bs : 0);
    if (!q) {
        if (h) PyErr_SetString(PyExc_ValueError, "aio.run: the queue is closed");
        goto release;
    }
    if (fds.len < n * (Py_ssize_t)sizeof(int32_t) || reads.len < n || sizes.len < n * (Py_ssize_t)sizeof(int64_t) ||
        data.len < bs) {
        PyErr_SetString(PyExc_ValueError, "aio.run: fds, reads or sizes shorter than offsets, or data shorter than bs");
        goto release;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t len = ((const int64_t *)sizes.buf)[i];
        if (len < 1 || len > bs) {
            PyErr_Format(PyExc_ValueError, "aio.run: I/O %zd has size %lld, outside 1..%zd (the queue's block)", i,
                         (long long)len, bs);
            goto release;
        }
    }
    if (!writable_int64(&set_up, n, "set_up") || !writable_int64(&issued, n, "issued") ||
        !writable_int64(&reaped, n, "reaped") || !writable_int64(&res, n, "res") ||
        !writable_int64(&submit_calls, n, "submit_calls") || !writable_int64(&complete_calls, n, "complete_calls") ||
        !writable_int64(&depth_at_commit, n, "depth_at_commit"))
        goto release;
    int per_io = data.len >= n * bs;
    if (!per_io) /* one block for every write: into every slot once */
        for (int s = 0; s < q->depth; s++) memcpy(q->buffers + (size_t)s * q->bs, data.buf, q->bs);
    run_args a = {fds.buf, offsets.buf, reads.buf, sizes.buf, n, deadline_ns,
                  batch_submit < 1 ? q->depth : batch_submit, complete_min, complete_max,
                  depth_low < 1 ? q->depth : depth_low, set_up.buf, issued.buf, reaped.buf, res.buf, submit_calls.buf,
                  complete_calls.buf, 0, 0, depth_at_commit.buf, data.buf, per_io};
    if (a.batch_submit > q->depth) a.batch_submit = q->depth;
    int64_t done;
    Py_BEGIN_ALLOW_THREADS
    done = run_queue(q, &a);
    Py_END_ALLOW_THREADS
    if (done < 0) {
        errno = (int)-done;
        PyErr_SetFromErrno(PyExc_OSError);
    } else {
        result = Py_BuildValue("LLL", (long long)done, (long long)a.n_submit_calls, (long long)a.n_complete_calls);
    }
release:
    PyBuffer_Release(&fds);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&reads);
    PyBuffer_Release(&sizes);
    PyBuffer_Release(&data);
    PyBuffer_Release(&set_up);
    PyBuffer_Release(&issued);
    PyBuffer_Release(&reaped);
    PyBuffer_Release(&res);
    PyBuffer_Release(&submit_calls);
    PyBuffer_Release(&complete_calls);
    PyBuffer_Release(&depth_at_commit);
    return result;
}

static PyMethodDef methods[] = {
    {"open", open_queue, METH_VARARGS, "open(engine, depth, bs) -> queue (libaio, io_uring or posixaio)"},
    {"close", close_queue, METH_VARARGS, "close(queue): release the kernel context and buffers now"},
    {"run", run, METH_VARARGS,
     "run(queue, fds, offsets, reads, sizes, data, batch_submit, complete_min, complete_max, depth_low, deadline_ns, "
     "set_up, issued, reaped, res, submit_calls, complete_calls, depth_at_commit) -> (issued, submits, reaps)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_aio", "libaio and io_uring at a queue depth", -1,
                                    methods};

PyMODINIT_FUNC PyInit__aio(void) { return PyModule_Create(&module); }
