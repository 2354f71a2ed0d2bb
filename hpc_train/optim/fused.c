/* Fused optimizer updates for host arrays: one pass over parameter, gradient and state.
 *
 * NumPy needs about ten passes over memory for a momentum-SGD or Adam update (one
 * per operator, plus temporaries); these loops read each array once and write the
 * ones that change once. Same arithmetic, same order of operations per element as
 * the NumPy code in optimizers.py (the reference the tests compare against).
 * Compiled on first use by hpc_train/native.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

/* The four SGD variants for one gradient expression GRAD (of i). */
#define SGD_LOOPS(T, GRAD)                                                                    \
    {                                                                                         \
        if (!pb) {                                                                            \
            for (Py_ssize_t i = 0; i < n; i++) pw[i] -= tlr * (GRAD);                          \
        } else if (first) {                                                                   \
            for (Py_ssize_t i = 0; i < n; i++) {                                              \
                T grad = GRAD;                                                                \
                pb[i] = grad;                                                                 \
                pw[i] -= tlr * (nesterov ? grad + tm * grad : grad);                          \
            }                                                                                 \
        } else if (nesterov) {                                                                \
            for (Py_ssize_t i = 0; i < n; i++) {                                              \
                T grad = GRAD;                                                                \
                T v = tm * pb[i] + grad;                                                      \
                pb[i] = v;                                                                    \
                pw[i] -= tlr * (grad + tm * v);                                               \
            }                                                                                 \
        } else {                                                                              \
            for (Py_ssize_t i = 0; i < n; i++) {                                              \
                T v = tm * pb[i] + (GRAD);                                                    \
                pb[i] = v;                                                                    \
                pw[i] -= tlr * v;                                                             \
            }                                                                                 \
        }                                                                                     \
    }

/* sgd(param, grad, momentum_buffer_or_None, lr, momentum, weight_decay, nesterov, first_step) */
#define SGD(T, NAME)                                                                          \
    static PyObject *NAME(PyObject *self, PyObject *args) {                                  \
        Py_buffer w, g, b = {0};                                                              \
        PyObject *buf_obj;                                                                    \
        double lr, momentum, wd;                                                              \
        int nesterov, first;                                                                  \
        if (!PyArg_ParseTuple(args, "w*y*Odddpp", &w, &g, &buf_obj, &lr, &momentum, &wd,      \
                              &nesterov, &first))                                             \
            return NULL;                                                                      \
        int has_buf = buf_obj != Py_None;                                                     \
        if (has_buf && PyObject_GetBuffer(buf_obj, &b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) { \
            PyBuffer_Release(&w); PyBuffer_Release(&g); return NULL;                          \
        }                                                                                     \
        if (g.len != w.len || (has_buf && b.len != w.len)) {                                  \
            PyErr_SetString(PyExc_ValueError, "param, grad and buffer sizes differ");         \
        } else {                                                                              \
            T *restrict pw = w.buf;                                                           \
            T *restrict pb = has_buf ? b.buf : NULL;                                          \
            const T *restrict pg = g.buf;                                                     \
            const T tlr = (T)lr, tm = (T)momentum, twd = (T)wd;                               \
            Py_ssize_t n = w.len / (Py_ssize_t)sizeof(T);                                     \
            Py_BEGIN_ALLOW_THREADS                                                            \
            /* loop-invariant choices outside the loops: branch-free bodies vectorize */      \
            if (wd != 0) SGD_LOOPS(T, pg[i] + twd * pw[i])                                    \
            else SGD_LOOPS(T, pg[i])                                                          \
            Py_END_ALLOW_THREADS                                                              \
        }                                                                                     \
        PyBuffer_Release(&w); PyBuffer_Release(&g);                                           \
        if (has_buf) PyBuffer_Release(&b);                                                    \
        if (PyErr_Occurred()) return NULL;                                                    \
        Py_RETURN_NONE;                                                                       \
    }

/* adam(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled, step) */
#define ADAM(T, SQRT, NAME)                                                                   \
    static PyObject *NAME(PyObject *self, PyObject *args) {                                  \
        Py_buffer w, g, m, v;                                                                 \
        double lr, beta1, beta2, eps, wd;                                                     \
        int decoupled;                                                                        \
        long long step;                                                                       \
        if (!PyArg_ParseTuple(args, "w*y*w*w*dddddpL", &w, &g, &m, &v, &lr, &beta1, &beta2,   \
                              &eps, &wd, &decoupled, &step))                                  \
            return NULL;                                                                      \
        if (g.len != w.len || m.len != w.len || v.len != w.len) {                             \
            PyErr_SetString(PyExc_ValueError, "param, grad and state sizes differ");          \
        } else {                                                                              \
            T *restrict pw = w.buf;                                                           \
            T *restrict pm = m.buf;                                                           \
            T *restrict pv = v.buf;                                                           \
            const T *restrict pg = g.buf;                                                     \
            const T b1 = (T)beta1, b2 = (T)beta2, twd = (T)wd;                                \
            const T step_size = (T)(lr / (1 - pow(beta1, (double)step)));                     \
            const T correction2 = (T)(1 - pow(beta2, (double)step));                          \
            const T decay = (T)(1 - lr * wd), teps = (T)eps;                                  \
            Py_ssize_t n = w.len / (Py_ssize_t)sizeof(T);                                     \
            Py_BEGIN_ALLOW_THREADS                                                            \
            for (Py_ssize_t i = 0; i < n; i++) {                                              \
                T grad = pg[i];                                                               \
                if (wd != 0 && !decoupled) grad += twd * pw[i];                               \
                if (wd != 0 && decoupled) pw[i] *= decay;                                     \
                T mi = b1 * pm[i] + (1 - b1) * grad;                                          \
                T vi = b2 * pv[i] + (1 - b2) * grad * grad;                                   \
                pm[i] = mi;                                                                   \
                pv[i] = vi;                                                                   \
                pw[i] -= step_size * mi / (SQRT(vi / correction2) + teps);                    \
            }                                                                                 \
            Py_END_ALLOW_THREADS                                                              \
        }                                                                                     \
        PyBuffer_Release(&w); PyBuffer_Release(&g); PyBuffer_Release(&m); PyBuffer_Release(&v); \
        if (PyErr_Occurred()) return NULL;                                                    \
        Py_RETURN_NONE;                                                                       \
    }

SGD(float, sgd_float32)
SGD(double, sgd_float64)
ADAM(float, sqrtf, adam_float32)
ADAM(double, sqrt, adam_float64)

static PyMethodDef methods[] = {
    {"sgd_float32", sgd_float32, METH_VARARGS, "fused momentum SGD on float32 arrays"},
    {"sgd_float64", sgd_float64, METH_VARARGS, "fused momentum SGD on float64 arrays"},
    {"adam_float32", adam_float32, METH_VARARGS, "fused Adam/AdamW on float32 arrays"},
    {"adam_float64", adam_float64, METH_VARARGS, "fused Adam/AdamW on float64 arrays"},
    {NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
