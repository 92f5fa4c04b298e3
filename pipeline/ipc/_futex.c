/* Wake-ups for sleeping ring readers: a Linux futex on the ring's cursor word.
 *
 * Why: a reader with nothing to read either burns a core spinning or naps in fixed steps, and a
 * record that lands during a nap waits for its end (hundreds of us). Python has no futex call, so
 * this small module provides the three operations of the protocol (see pipeline/ipc/wake.py):
 *
 *   writer:  cursor = c (a sequentially consistent store: it is ordered before the next load);
 *            if sleepers != 0: futex_wake(&cursor)         one load when nobody sleeps, no syscall
 *   reader:  sleepers |= my bit (atomic, a full barrier); if cursor != pos: undo, return;
 *            futex_wait(&cursor, pos, timeout); sleepers &= ~my bit
 *
 * Either the reader sees the new cursor before sleeping, or the writer sees its bit and wakes it
 * (the Dekker pattern; both sides order their store before their load). futex_wait compares the
 * cursor's low 32 bits with the position the reader expects, so a publish between the check and
 * the wait makes the wait return at once. The futex is a shared one (no FUTEX_PRIVATE_FLAG): the
 * cursor lives in a MAP_SHARED segment and the kernel keys the wait on the page, not the address.
 *
 * The sleepers word is a bit mask (one bit per reader-table entry), not a count: a reader killed
 * while asleep leaves its bit, and whoever reaps its table entry clears that bit. A count could
 * not be repaired (was the dead reader counted or not?); a mask can never go negative.
 *
 * The buffers are the ring header as int64 words (a writable memoryview); the object holds the
 * buffer until close(). Nothing here reads an attribute of a Python object.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define API_VERSION 1

typedef struct {
    PyObject_HEAD
    Py_buffer hdr;
    int have_buf;
    int64_t *cursor;
    int64_t *sleepers;
    long long wakes; /* futex_wake calls made by publish() / wake() */
} Doorbell;

static long futex(void *addr, int op, uint32_t val, const struct timespec *ts) {
    return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}

static void release(Doorbell *self) {
    if (self->have_buf) {
        PyBuffer_Release(&self->hdr);
        self->have_buf = 0;
    }
    self->cursor = NULL;
    self->sleepers = NULL;
}

static void Doorbell_dealloc(Doorbell *self) {
    release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Doorbell_init(Doorbell *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"header", "cursor_word", "sleepers_word", NULL};
    PyObject *header;
    Py_ssize_t cw, sw;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Onn", kwlist, &header, &cw, &sw))
        return -1;
    release(self);
    if (PyObject_GetBuffer(header, &self->hdr, PyBUF_WRITABLE) < 0)
        return -1;
    self->have_buf = 1;
    Py_ssize_t words = self->hdr.len / 8;
    if ((uintptr_t)self->hdr.buf % 8 || cw < 0 || sw < 0 || cw >= words || sw >= words ||
        cw == sw) {
        release(self);
        PyErr_SetString(PyExc_ValueError, "cursor_word / sleepers_word outside the header");
        return -1;
    }
    self->cursor = (int64_t *)self->hdr.buf + cw;
    self->sleepers = (int64_t *)self->hdr.buf + sw;
    return 0;
}

static int check_open(Doorbell *self) {
    if (!self->have_buf) {
        PyErr_SetString(PyExc_ValueError, "doorbell is closed");
        return -1;
    }
    return 0;
}

/* A reader's sleepers bit as a mask; 0 with an exception set if `arg` is not 0..63 (or the
 * doorbell is closed). */
static int64_t bit_mask(Doorbell *self, PyObject *arg) {
    long bit = PyLong_AsLong(arg);
    if (bit == -1 && PyErr_Occurred())
        return 0;
    if (check_open(self) < 0)
        return 0;
    if (bit < 0 || bit > 63) {
        PyErr_SetString(PyExc_ValueError, "sleepers bit must be in 0..63");
        return 0;
    }
    return (int64_t)((uint64_t)1 << bit);
}

static inline void wake_all(Doorbell *self) {
    /* the low 32 bits of the little-endian cursor are the futex word */
    futex(self->cursor, FUTEX_WAKE, INT_MAX, NULL);
    self->wakes++;
}

PyDoc_STRVAR(publish_doc,
"publish(cursor) -> None\n\n"
"Store the ring's cursor (ordered before what follows) and wake the sleeping readers, if any.\n"
"Nobody asleep: one store and one load, no system call.");

static PyObject *Doorbell_publish(Doorbell *self, PyObject *arg) {
    long long c = PyLong_AsLongLong(arg);
    if (c == -1 && PyErr_Occurred())
        return NULL;
    if (check_open(self) < 0)
        return NULL;
    __atomic_store_n(self->cursor, (int64_t)c, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(self->sleepers, __ATOMIC_SEQ_CST))
        wake_all(self);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(wake_doc, "wake() -> None\n\nWake every reader asleep on the cursor (e.g. on close).");

static PyObject *Doorbell_wake(Doorbell *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self) < 0)
        return NULL;
    wake_all(self);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(sleep_doc,
"sleep(bit, pos, timeout_s) -> int\n\n"
"Sleep until the cursor moves from pos, at most timeout_s, as the reader owning sleepers bit\n"
"`bit` (0..63). Returns 1 if the cursor was already elsewhere (no sleep), 0 after a wake-up or\n"
"a spurious return, -1 on timeout. The GIL is released while asleep; a signal ends the sleep\n"
"and its Python handler runs before this returns (an exception it raises propagates). The bit\n"
"is cleared again on every return.");

static PyObject *Doorbell_sleep(Doorbell *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "sleep(bit, pos, timeout_s)");
        return NULL;
    }
    int64_t mask = bit_mask(self, args[0]);
    if (!mask)
        return NULL;
    long long pos = PyLong_AsLongLong(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    double timeout = PyFloat_AsDouble(args[2]);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    if (!(timeout >= 0.0) || timeout > 3600.0)
        timeout = timeout > 3600.0 ? 3600.0 : 0.0;
    int64_t *cursor = self->cursor, *sleepers = self->sleepers;
    __atomic_fetch_or(sleepers, mask, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(cursor, __ATOMIC_SEQ_CST) != (int64_t)pos) {
        __atomic_fetch_and(sleepers, ~mask, __ATOMIC_SEQ_CST);
        return PyLong_FromLong(1);
    }
    struct timespec ts;
    ts.tv_sec = (time_t)timeout;
    ts.tv_nsec = (long)((timeout - (double)ts.tv_sec) * 1e9);
    long r;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    r = futex(cursor, FUTEX_WAIT, (uint32_t)(uint64_t)pos, &ts);
    if (r < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    __atomic_fetch_and(sleepers, ~mask, __ATOMIC_SEQ_CST);
    if (r < 0 && err == EINTR && PyErr_CheckSignals() < 0)
        return NULL;
    if (r < 0 && err == ETIMEDOUT)
        return PyLong_FromLong(-1);
    return PyLong_FromLong(0); /* woken, EAGAIN (moved before we slept), EINTR, spurious */
}

PyDoc_STRVAR(clear_doc,
"clear(bit) -> None\n\nClear sleepers bit `bit` (the reaper of a dead reader's table entry).");

static PyObject *Doorbell_clear(Doorbell *self, PyObject *arg) {
    int64_t mask = bit_mask(self, arg);
    if (!mask)
        return NULL;
    __atomic_fetch_and(self->sleepers, ~mask, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *Doorbell_close(Doorbell *self, PyObject *Py_UNUSED(ignored)) {
    release(self);
    Py_RETURN_NONE;
}

static PyMethodDef Doorbell_methods[] = {
    {"publish", (PyCFunction)Doorbell_publish, METH_O, publish_doc},
    {"wake", (PyCFunction)Doorbell_wake, METH_NOARGS, wake_doc},
    {"sleep", (PyCFunction)(void (*)(void))Doorbell_sleep, METH_FASTCALL, sleep_doc},
    {"clear", (PyCFunction)Doorbell_clear, METH_O, clear_doc},
    {"close", (PyCFunction)Doorbell_close, METH_NOARGS, "Release the header buffer."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Doorbell_members[] = {
    {"wakes", T_LONGLONG, offsetof(Doorbell, wakes), READONLY,
     "futex wake calls made through this object"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject DoorbellType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pipeline.ipc._futex.Doorbell",
    .tp_basicsize = sizeof(Doorbell),
    .tp_dealloc = (destructor)Doorbell_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Doorbell(header, cursor_word, sleepers_word): futex wake-ups on a ring cursor.",
    .tp_methods = Doorbell_methods,
    .tp_members = Doorbell_members,
    .tp_init = (initproc)Doorbell_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef futex_module = {
    PyModuleDef_HEAD_INIT, "pipeline.ipc._futex",
    "Futex wake-ups for sleeping ring readers (see pipeline/ipc/wake.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__futex(void) {
    if (PyType_Ready(&DoorbellType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&futex_module);
    if (!m)
        return NULL;
    Py_INCREF(&DoorbellType);
    if (PyModule_AddObject(m, "Doorbell", (PyObject *)&DoorbellType) < 0) {
        Py_DECREF(&DoorbellType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "API_VERSION", API_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
