/* Compiled fast path for the ingest hot path: combined-stream aggTrade frame -> ring slot.
 *
 * Why it exists: in pure Python the ingest process spends ~3.6 us of CPU per aggTrade frame
 * (typed JSON decode 1.3 us, building and packing the record tuple ~0.6 us, id tracking and
 * ring bookkeeping, picows' callback layer); the target is <= 2 us. This module does the common
 * case of the frame handler in one C call: parse the frame bytes, check that the aggregate trade
 * id is the next expected one for its symbol, and write the record straight into its ring slot
 * (staged, exactly as WriterCore.stage does: intent word, record, sequence stamp). The writer's
 * cursor/commit logic stays in Python (pipeline/ring.py); this only stages.
 *
 * Conservative by construction: it accepts only a strict subset of JSON (ASCII only, no string
 * escapes, no nested values besides `data`, each required field exactly once, prices/quantities
 * as plain decimal strings, ids as non-negative integers of at most 18 digits). Anything else,
 * and any id that is not last + 1 (duplicates, gaps, the first trade of a symbol), is handed to
 * the Python handler untouched, which decides with the full decoder (tests check that every
 * frame this path accepts decodes to the same record bytes there).
 *
 * Floats: a decimal with a mantissa < 2^53 and <= 22 fractional digits is converted as
 * mantissa / 10^k, which is correctly rounded (both operands are exact doubles and IEEE division
 * rounds once), i.e. the same double as Python's float(); anything longer goes through
 * PyOS_string_to_double (also correctly rounded).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"
#include <stdint.h>
#include <string.h>
#include <math.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the tick record layout is little-endian; this fast path writes native integers"
#endif

/* ---- the record layout it writes (pipeline/records.py TICK_DTYPE; checked at import time by
 * pipeline/fastpath.py against the dtype, so a layout change cannot silently corrupt rings) -- */
#define OFF_KIND 0
#define OFF_FLAGS 1
#define OFF_SYMBOL 2
#define OFF_LEVEL 4
#define OFF_PAD 6
#define OFF_PRICE 8
#define OFF_QTY 16
#define OFF_BID_PRICE 24
#define OFF_TRADE_ID 56
#define OFF_AUX_ID 64
#define OFF_EVENT_TIME 72
#define OFF_RECV_TIME 80
#define OFF_PUBLISH_TIME 88
#define RECORD_BYTES 96
#define KIND_AGG_TRADE 1
#define FLAG_BUYER_IS_MAKER 1

#define MAX_INT_DIGITS 18       /* < 2^63 without overflow checks */
#define MAX_DECIMAL_CHARS 40    /* longer price/qty strings go to the Python path */

/* ---- parsing ------------------------------------------------------------------------------ */

typedef struct {
    const char *p;
    const char *end;
} Cur;

typedef struct {
    const char *stream;
    Py_ssize_t stream_len;
    int64_t E, a, l;
    double price, qty;
    int maker;
} Agg;

static inline void skip_ws(Cur *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\n' || *c->p == '\r' || *c->p == '\t'))
        c->p++;
}

/* A string without escapes or non-ASCII bytes: sets *s / *n to its contents. */
static inline int plain_string(Cur *c, const char **s, Py_ssize_t *n) {
    if (c->p >= c->end || *c->p != '"')
        return 0;
    const char *start = ++c->p;
    while (c->p < c->end) {
        unsigned char ch = (unsigned char)*c->p;
        if (ch == '"') {
            *s = start;
            *n = c->p - start;
            c->p++;
            return 1;
        }
        if (ch == '\\' || ch < 0x20 || ch >= 0x80)
            return 0;
        c->p++;
    }
    return 0;
}

/* Non-negative JSON integer (no fraction, no exponent), at most MAX_INT_DIGITS digits. */
static inline int json_uint(Cur *c, int64_t *out) {
    const char *p = c->p, *end = c->end;
    if (p >= end || *p < '0' || *p > '9')
        return 0;
    if (*p == '0' && p + 1 < end && p[1] >= '0' && p[1] <= '9')
        return 0; /* leading zero: not JSON */
    int64_t v = 0;
    int digits = 0;
    while (p < end && *p >= '0' && *p <= '9') {
        if (++digits > MAX_INT_DIGITS)
            return 0;
        v = v * 10 + (*p - '0');
        p++;
    }
    if (p < end && (*p == '.' || *p == 'e' || *p == 'E'))
        return 0; /* a float where an integer belongs: the Python path judges it */
    *out = v;
    c->p = p;
    return 1;
}

static const double POW10[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                 1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* "digits" or "digits.digits" inside quotes -> the nearest double (= Python float()). */
static inline int decimal_string(Cur *c, double *out) {
    const char *s;
    Py_ssize_t n;
    if (!plain_string(c, &s, &n) || n == 0 || n > MAX_DECIMAL_CHARS)
        return 0;
    if (n > 1 && s[0] == '0' && s[1] != '.')
        return 0; /* "01.5": float() takes it, stricter decoders may not; the Python path decides */
    uint64_t m = 0;
    int sig = 0, frac = -1, i;
    for (i = 0; i < n; i++) {
        char ch = s[i];
        if (ch >= '0' && ch <= '9') {
            if (frac >= 0)
                frac++;
            if (m || ch != '0')
                sig++;
            if (sig <= 19)
                m = m * 10 + (uint64_t)(ch - '0');
        } else if (ch == '.' && frac < 0 && i > 0 && i < n - 1) {
            frac = 0;
        } else {
            return 0;
        }
    }
    if (frac < 0)
        frac = 0;
    if (sig <= 15 && frac <= 22) { /* m < 10^15 < 2^53: exact; one rounding in the division */
        *out = (double)m / POW10[frac];
        return 1;
    }
    char buf[MAX_DECIMAL_CHARS + 1];
    memcpy(buf, s, (size_t)n);
    buf[n] = '\0';
    char *endp = NULL;
    double v = PyOS_string_to_double(buf, &endp, NULL);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (endp != buf + n || !isfinite(v))
        return 0;
    *out = v;
    return 1;
}

static inline int literal(Cur *c, const char *lit, Py_ssize_t n) {
    if (c->end - c->p < n || memcmp(c->p, lit, (size_t)n) != 0)
        return 0;
    c->p += n;
    return 1;
}

/* Skip a number of a field we do not use: -?int(.frac)?, at most MAX_INT_DIGITS integer digits,
 * no exponent. Stricter than JSON on purpose: the Python decoders reject some valid JSON
 * numbers (1e999 overflows, integers beyond 64 bits), and this path must never take a frame
 * they would refuse. */
static inline int skip_number(Cur *c) {
    const char *p = c->p, *end = c->end;
    if (p < end && *p == '-')
        p++;
    if (p >= end || *p < '0' || *p > '9')
        return 0;
    if (*p == '0' && p + 1 < end && p[1] >= '0' && p[1] <= '9')
        return 0;
    const char *digits = p;
    while (p < end && *p >= '0' && *p <= '9')
        p++;
    if (p - digits > MAX_INT_DIGITS)
        return 0;
    if (p < end && *p == '.') {
        p++;
        const char *frac = p;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
        if (p == frac || p - frac > MAX_DECIMAL_CHARS)
            return 0;
    }
    if (p < end && (*p == 'e' || *p == 'E'))
        return 0;
    c->p = p;
    return 1;
}

/* Skip a scalar value of a field we do not use: plain string, number, true/false/null. */
static inline int skip_scalar(Cur *c) {
    if (c->p >= c->end)
        return 0;
    switch (*c->p) {
    case '"': {
        const char *s;
        Py_ssize_t n;
        return plain_string(c, &s, &n);
    }
    case 't':
        return literal(c, "true", 4);
    case 'f':
        return literal(c, "false", 5);
    case 'n':
        return literal(c, "null", 4);
    default:
        return skip_number(c);
    }
}

enum { F_E = 1, F_A = 2, F_P = 4, F_Q = 8, F_L = 16, F_M = 32, F_ALL = 63 };

/* The aggTrade payload object. */
static int parse_data(Cur *c, Agg *g, int64_t max_event) {
    int seen = 0;
    if (c->p >= c->end || *c->p != '{')
        return 0;
    c->p++;
    skip_ws(c);
    if (c->p < c->end && *c->p == '}')
        return 0; /* empty: fields missing, the Python path counts it */
    for (;;) {
        const char *k;
        Py_ssize_t kn;
        skip_ws(c);
        if (!plain_string(c, &k, &kn))
            return 0;
        skip_ws(c);
        if (c->p >= c->end || *c->p != ':')
            return 0;
        c->p++;
        skip_ws(c);
        int bit = 0, ok;
        if (kn == 1) {
            switch (k[0]) {
            case 'E': bit = F_E; break;
            case 'a': bit = F_A; break;
            case 'p': bit = F_P; break;
            case 'q': bit = F_Q; break;
            case 'l': bit = F_L; break;
            case 'm': bit = F_M; break;
            default: break;
            }
        }
        if (bit & seen)
            return 0; /* a required key twice: let the full decoder decide */
        seen |= bit;
        switch (bit) {
        case F_E: ok = json_uint(c, &g->E) && g->E <= max_event; break;
        case F_A: ok = json_uint(c, &g->a); break;
        case F_L: ok = json_uint(c, &g->l); break;
        case F_P: ok = decimal_string(c, &g->price); break;
        case F_Q: ok = decimal_string(c, &g->qty); break;
        case F_M:
            if (literal(c, "true", 4)) {
                g->maker = 1;
                ok = 1;
            } else if (literal(c, "false", 5)) {
                g->maker = 0;
                ok = 1;
            } else {
                ok = 0;
            }
            break;
        default: ok = skip_scalar(c); break;
        }
        if (!ok)
            return 0;
        skip_ws(c);
        if (c->p >= c->end)
            return 0;
        if (*c->p == ',') {
            c->p++;
            continue;
        }
        if (*c->p == '}') {
            c->p++;
            return seen == F_ALL;
        }
        return 0;
    }
}

/* ---- routing: stream name -> symbol id (open addressing, FNV-1a) --------------------------- */

typedef struct {
    uint64_t hash;
    char *name; /* NULL: empty slot */
    Py_ssize_t len;
    int sid;
} Route;

static inline uint64_t fnv1a(const char *s, Py_ssize_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ULL;
    }
    return h;
}

/* ---- the object ---------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Route *routes;
    Py_ssize_t route_mask;
    Py_ssize_t n_symbols;
    int64_t *last;     /* per symbol: last published aggregate id (valid when armed) */
    char *armed;       /* per symbol: 1 = this path may publish last + 1 */
    PyObject *writer;  /* the ring writer whose _cursor / _staged it shares; NULL: parse only */
    PyObject *fallback;
    Py_buffer data, seqs, hdr;
    int have_bufs;
    int64_t mask, record_size, max_staged, intent_word;
    int64_t time_mult, max_event; /* ns per unit of E (timeUnit); E * time_mult fits in int64 */
    Py_ssize_t max_frame_bytes;
    int iter_open;
    long long frames;
} AggFastPath;

static PyObject *S_cursor, *S_staged, *S_last_ns, *S_first_pending;

static int route_lookup(AggFastPath *self, const char *s, Py_ssize_t n) {
    uint64_t h = fnv1a(s, n);
    Py_ssize_t i = (Py_ssize_t)(h & (uint64_t)self->route_mask);
    for (;;) {
        Route *r = &self->routes[i];
        if (r->name == NULL)
            return -1;
        if (r->hash == h && r->len == n && memcmp(r->name, s, (size_t)n) == 0)
            return r->sid;
        i = (i + 1) & self->route_mask;
    }
}

/* Frame -> Agg with symbol id; 0 if this path does not take it. */
static int parse_frame(AggFastPath *self, const char *buf, Py_ssize_t n, Agg *g, int *sid) {
    Cur c = {buf, buf + n};
    int have_stream = 0, have_data = 0;
    *sid = -1;
    skip_ws(&c);
    if (c.p >= c.end || *c.p != '{')
        return 0;
    c.p++;
    for (;;) {
        const char *k;
        Py_ssize_t kn;
        skip_ws(&c);
        if (!plain_string(&c, &k, &kn))
            return 0;
        skip_ws(&c);
        if (c.p >= c.end || *c.p != ':')
            return 0;
        c.p++;
        skip_ws(&c);
        if (kn == 6 && memcmp(k, "stream", 6) == 0 && !have_stream) {
            if (!plain_string(&c, &g->stream, &g->stream_len))
                return 0;
            *sid = route_lookup(self, g->stream, g->stream_len);
            if (*sid < 0)
                return 0; /* not one of our aggTrade streams: decline before parsing data */
            have_stream = 1;
        } else if (kn == 4 && memcmp(k, "data", 4) == 0 && !have_data) {
            if (!parse_data(&c, g, self->max_event))
                return 0;
            have_data = 1;
        } else {
            return 0;
        }
        skip_ws(&c);
        if (c.p >= c.end)
            return 0;
        if (*c.p == ',') {
            c.p++;
            continue;
        }
        if (*c.p != '}')
            return 0;
        c.p++;
        skip_ws(&c);
        return c.p == c.end && have_stream && have_data;
    }
}

static inline void write_record(char *rec, const Agg *g, int sid, int64_t recv_ns,
                                int64_t time_mult) {
    int64_t ev = g->E * time_mult, zero = 0;
    double dz = 0.0;
    uint16_t sym = (uint16_t)sid, z16 = 0;
    rec[OFF_KIND] = KIND_AGG_TRADE;
    rec[OFF_FLAGS] = g->maker ? FLAG_BUYER_IS_MAKER : 0;
    memcpy(rec + OFF_SYMBOL, &sym, 2);
    memcpy(rec + OFF_LEVEL, &z16, 2);
    memcpy(rec + OFF_PAD, &z16, 2);
    memcpy(rec + OFF_PRICE, &g->price, 8);
    memcpy(rec + OFF_QTY, &g->qty, 8);
    for (int k = 0; k < 4; k++)
        memcpy(rec + OFF_BID_PRICE + 8 * k, &dz, 8);
    memcpy(rec + OFF_TRADE_ID, &g->a, 8);
    memcpy(rec + OFF_AUX_ID, &g->l, 8);
    memcpy(rec + OFF_EVENT_TIME, &ev, 8);
    memcpy(rec + OFF_RECV_TIME, &recv_ns, 8);
    memcpy(rec + OFF_PUBLISH_TIME, &zero, 8);
}

static void release_buffers(AggFastPath *self) {
    if (self->have_bufs) {
        PyBuffer_Release(&self->data);
        PyBuffer_Release(&self->seqs);
        PyBuffer_Release(&self->hdr);
        self->have_bufs = 0;
    }
}

static int AggFastPath_traverse(AggFastPath *self, visitproc visit, void *arg) {
    Py_VISIT(self->writer);
    Py_VISIT(self->fallback);
    return 0;
}

static int AggFastPath_clear(AggFastPath *self) {
    release_buffers(self);
    Py_CLEAR(self->writer);
    Py_CLEAR(self->fallback);
    return 0;
}

static void AggFastPath_dealloc(AggFastPath *self) {
    PyObject_GC_UnTrack(self);
    AggFastPath_clear(self);
    if (self->routes) {
        for (Py_ssize_t i = 0; i <= self->route_mask; i++)
            PyMem_Free(self->routes[i].name);
        PyMem_Free(self->routes);
    }
    PyMem_Free(self->last);
    PyMem_Free(self->armed);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int get_buffer_attr(PyObject *obj, const char *name, Py_buffer *view) {
    PyObject *mv = PyObject_GetAttrString(obj, name);
    if (mv == NULL)
        return -1;
    int rc = PyObject_GetBuffer(mv, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS);
    Py_DECREF(mv);
    return rc;
}

static int64_t int_attr(PyObject *obj, const char *name, int *err) {
    PyObject *v = PyObject_GetAttrString(obj, name);
    if (v == NULL) {
        *err = 1;
        return 0;
    }
    long long x = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (x == -1 && PyErr_Occurred())
        *err = 1;
    return x;
}

static int AggFastPath_init(AggFastPath *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"routes", "n_symbols", "writer", "fallback", "intent_word",
                             "max_frame_bytes", "time_mult", NULL};
    PyObject *routes, *writer = Py_None, *fallback = Py_None;
    Py_ssize_t n_symbols, intent_word = 0, max_frame = PY_SSIZE_T_MAX;
    long long time_mult = 1000000;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!n|OOnnL", kwlist, &PyDict_Type, &routes,
                                     &n_symbols, &writer, &fallback, &intent_word, &max_frame,
                                     &time_mult))
        return -1;
    if (self->routes != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "AggFastPath is initialised once");
        return -1;
    }
    if (n_symbols < 1 || n_symbols > 65535) {
        PyErr_SetString(PyExc_ValueError, "n_symbols must be in 1..65535");
        return -1;
    }
    if (time_mult < 1) {
        PyErr_SetString(PyExc_ValueError, "time_mult must be >= 1 (ns per unit of E)");
        return -1;
    }
    self->n_symbols = n_symbols;
    self->max_frame_bytes = max_frame;
    self->time_mult = time_mult;
    self->max_event = INT64_MAX / time_mult;
    self->last = PyMem_Calloc((size_t)n_symbols, sizeof(int64_t));
    self->armed = PyMem_Calloc((size_t)n_symbols, 1);
    Py_ssize_t size = 8;
    while (size < 2 * PyDict_GET_SIZE(routes) + 1)
        size *= 2;
    self->routes = PyMem_Calloc((size_t)size, sizeof(Route));
    self->route_mask = size - 1;
    if (!self->last || !self->armed || !self->routes) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(routes, &pos, &key, &value)) {
        if (!PyBytes_Check(key)) {
            PyErr_SetString(PyExc_TypeError, "routes keys must be bytes (stream names)");
            return -1;
        }
        long sid = PyLong_AsLong(value);
        if (sid == -1 && PyErr_Occurred())
            return -1;
        if (sid < 0 || sid >= n_symbols) {
            PyErr_SetString(PyExc_ValueError, "route symbol id out of range");
            return -1;
        }
        const char *s = PyBytes_AS_STRING(key);
        Py_ssize_t n = PyBytes_GET_SIZE(key);
        uint64_t h = fnv1a(s, n);
        Py_ssize_t i = (Py_ssize_t)(h & (uint64_t)self->route_mask);
        while (self->routes[i].name != NULL)
            i = (i + 1) & self->route_mask;
        self->routes[i].name = PyMem_Malloc((size_t)n + 1);
        if (!self->routes[i].name) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(self->routes[i].name, s, (size_t)n);
        self->routes[i].hash = h;
        self->routes[i].len = n;
        self->routes[i].sid = (int)sid;
    }
    if (writer != Py_None) {
        int err = 0;
        int64_t capacity = int_attr(writer, "capacity", &err);
        int64_t rs = int_attr(writer, "_rs", &err);
        int64_t max_staged = int_attr(writer, "max_staged", &err);
        if (err)
            return -1;
        if (capacity < 2 || (capacity & (capacity - 1)) || rs < RECORD_BYTES || max_staged < 1) {
            PyErr_SetString(PyExc_ValueError, "writer geometry unusable for the fast path");
            return -1;
        }
        if (get_buffer_attr(writer, "_data", &self->data) < 0)
            return -1;
        if (get_buffer_attr(writer, "_seqs", &self->seqs) < 0) {
            PyBuffer_Release(&self->data);
            return -1;
        }
        if (get_buffer_attr(writer, "_hdr", &self->hdr) < 0) {
            PyBuffer_Release(&self->data);
            PyBuffer_Release(&self->seqs);
            return -1;
        }
        self->have_bufs = 1;
        if (self->data.len < capacity * rs || self->seqs.len < capacity * 8 ||
            intent_word < 0 || self->hdr.len < (intent_word + 1) * 8) {
            release_buffers(self);
            PyErr_SetString(PyExc_ValueError, "writer buffers smaller than its geometry");
            return -1;
        }
        self->mask = capacity - 1;
        self->record_size = rs;
        self->max_staged = max_staged;
        self->intent_word = intent_word;
        if (!PyCallable_Check(fallback)) {
            release_buffers(self);
            PyErr_SetString(PyExc_TypeError, "a writer needs a callable fallback");
            return -1;
        }
    }
    Py_INCREF(writer);
    Py_XSETREF(self->writer, writer);
    Py_INCREF(fallback);
    Py_XSETREF(self->fallback, fallback);
    return 0;
}

/* Stage the record into the writer's next slot, as WriterCore.stage does. Returns the number
 * of staged records afterwards, -1 with an exception set, or -2 (nothing written) if a full
 * batch is still waiting for its commit. */
static int64_t stage(AggFastPath *self, const Agg *g, int sid, int64_t recv_ns) {
    PyObject *o = PyObject_GetAttr(self->writer, S_cursor);
    if (!o)
        return -1;
    int64_t cursor = PyLong_AsLongLong(o);
    Py_DECREF(o);
    o = PyObject_GetAttr(self->writer, S_staged);
    if (!o)
        return -1;
    int64_t staged = PyLong_AsLongLong(o);
    Py_DECREF(o);
    if (PyErr_Occurred())
        return -1;
    if (staged >= self->max_staged)
        return -2; /* the shell has not committed a full batch: let WriterCore.stage handle it */
    int64_t s = cursor + staged, i = s & self->mask;
    int64_t *hdr = (int64_t *)self->hdr.buf, *seqs = (int64_t *)self->seqs.buf;
    /* intent before the slot is touched, the slot before its sequence stamp: a lagging reader
     * must never take a half-written slot for a good one (the release fences keep the stores in
     * this order for the compiler, and for the CPU where it could reorder stores) */
    __atomic_store_n(&hdr[self->intent_word], s + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    write_record((char *)self->data.buf + i * self->record_size, g, sid, recv_ns,
                 self->time_mult);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&seqs[i], s, __ATOMIC_RELAXED);
    o = PyLong_FromLongLong(staged + 1);
    if (!o)
        return -1;
    int rc = PyObject_SetAttr(self->writer, S_staged, o);
    Py_DECREF(o);
    return rc < 0 ? -1 : staged + 1;
}

static int get_payload(PyObject *payload, Py_buffer *view, const char **buf, Py_ssize_t *n) {
    if (PyBytes_CheckExact(payload)) {
        *buf = PyBytes_AS_STRING(payload);
        *n = PyBytes_GET_SIZE(payload);
        view->obj = NULL;
        return 0;
    }
    if (PyObject_GetBuffer(payload, view, PyBUF_SIMPLE) < 0)
        return -1;
    *buf = view->buf;
    *n = view->len;
    return 0;
}

static PyObject *call_fallback(AggFastPath *self, PyObject *conn, PyObject *payload,
                               PyObject *recv, long code) {
    PyObject *c = PyLong_FromLong(code);
    if (!c)
        return NULL;
    PyObject *args[4] = {conn, payload, recv, c};
    PyObject *r = PyObject_Vectorcall(self->fallback, args, 4, NULL);
    Py_DECREF(c);
    return r;
}

PyDoc_STRVAR(on_message_doc,
"on_message(conn, payload, recv_time_ns) -> None\n\n"
"The frame callback. The common case (one of our aggTrade streams, the next id of an armed\n"
"symbol) is staged into the ring here; then conn.last_ns = recv_time_ns, and the fallback is\n"
"called with code 2 if Python must act (commit the batch, open the loop iteration, the\n"
"connection's first frame). Any other frame: fallback(conn, payload, recv_time_ns, 0),\n"
"nothing written, no state changed.");

static PyObject *AggFastPath_on_message(AggFastPath *self, PyObject *const *args,
                                        Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "on_message(conn, payload, recv_time_ns)");
        return NULL;
    }
    if (!self->have_bufs) {
        PyErr_SetString(PyExc_RuntimeError, "AggFastPath has no ring writer (closed?)");
        return NULL;
    }
    PyObject *conn = args[0], *payload = args[1], *recv = args[2];
    Py_buffer view;
    const char *buf;
    Py_ssize_t n;
    if (get_payload(payload, &view, &buf, &n) < 0) {
        PyErr_Clear();
        return call_fallback(self, conn, payload, recv, 0);
    }
    Agg g;
    int sid = -1;
    int ok = n <= self->max_frame_bytes && parse_frame(self, buf, n, &g, &sid);
    if (view.obj)
        PyBuffer_Release(&view);
    if (!ok || !self->armed[sid] || g.a != self->last[sid] + 1)
        return call_fallback(self, conn, payload, recv, 0);
    int64_t recv_ns = PyLong_AsLongLong(recv);
    if (recv_ns == -1 && PyErr_Occurred())
        return NULL;
    int64_t staged = stage(self, &g, sid, recv_ns);
    if (staged == -2)
        return call_fallback(self, conn, payload, recv, 0);
    if (staged < 0)
        return NULL;
    self->last[sid] = g.a;
    self->frames++;
    if (PyObject_SetAttr(conn, S_last_ns, recv) < 0)
        return NULL;
    int act = staged >= self->max_staged || !self->iter_open;
    if (!act) {
        PyObject *fp = PyObject_GetAttr(conn, S_first_pending);
        if (!fp)
            return NULL;
        act = PyObject_IsTrue(fp);
        Py_DECREF(fp);
        if (act < 0)
            return NULL;
    }
    if (act)
        return call_fallback(self, conn, payload, recv, 2);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(parse_doc,
"parse(payload, recv_time_ns=0) -> (symbol_id, agg_id, record: bytes) | None\n\n"
"What on_message would write for this frame (publish_time_ns 0), ignoring the id state;\n"
"None if this path declines it. For tests and benchmarks.");

static PyObject *AggFastPath_parse(AggFastPath *self, PyObject *args) {
    Py_buffer view;
    long long recv_ns = 0;
    if (!PyArg_ParseTuple(args, "y*|L", &view, &recv_ns))
        return NULL;
    Agg g;
    int sid = -1;
    int ok = view.len <= self->max_frame_bytes &&
             parse_frame(self, view.buf, view.len, &g, &sid);
    PyBuffer_Release(&view);
    if (!ok)
        Py_RETURN_NONE;
    PyObject *rec = PyBytes_FromStringAndSize(NULL, RECORD_BYTES);
    if (!rec)
        return NULL;
    write_record(PyBytes_AS_STRING(rec), &g, sid, recv_ns, self->time_mult);
    return Py_BuildValue("iLN", sid, (long long)g.a, rec);
}

static int check_sid(AggFastPath *self, Py_ssize_t sid) {
    if (sid < 0 || sid >= self->n_symbols) {
        PyErr_SetString(PyExc_IndexError, "symbol id out of range");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(last_id_doc,
"last_id(symbol_id) -> int | None\n\n"
"The last aggregate id this path published for the symbol, None while it is disarmed.");

static PyObject *AggFastPath_last_id(AggFastPath *self, PyObject *arg) {
    Py_ssize_t sid = PyLong_AsSsize_t(arg);
    if (sid == -1 && PyErr_Occurred())
        return NULL;
    if (check_sid(self, sid) < 0)
        return NULL;
    if (!self->armed[sid])
        Py_RETURN_NONE;
    return PyLong_FromLongLong(self->last[sid]);
}

PyDoc_STRVAR(set_last_doc,
"set_last(symbol_id, last: int | None) -> None\n\n"
"Arm the symbol (this path publishes last + 1 next), or disarm it with None (everything of it\n"
"goes to the fallback: a gap is open, or no trade was seen yet).");

static PyObject *AggFastPath_set_last(AggFastPath *self, PyObject *const *args,
                                      Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_last(symbol_id, last)");
        return NULL;
    }
    Py_ssize_t sid = PyLong_AsSsize_t(args[0]);
    if (sid == -1 && PyErr_Occurred())
        return NULL;
    if (check_sid(self, sid) < 0)
        return NULL;
    if (args[1] == Py_None) {
        self->armed[sid] = 0;
        Py_RETURN_NONE;
    }
    long long last = PyLong_AsLongLong(args[1]);
    if (last == -1 && PyErr_Occurred())
        return NULL;
    self->last[sid] = last;
    self->armed[sid] = last < INT64_MAX; /* last + 1 must not overflow */
    Py_RETURN_NONE;
}

PyDoc_STRVAR(close_doc,
"close() -> None\n\n"
"Release the ring buffers (the ring's shared memory cannot be closed while they are held).");

static PyObject *AggFastPath_close(AggFastPath *self, PyObject *Py_UNUSED(ignored)) {
    release_buffers(self);
    Py_RETURN_NONE;
}

static PyMethodDef AggFastPath_methods[] = {
    {"on_message", (PyCFunction)(void (*)(void))AggFastPath_on_message, METH_FASTCALL,
     on_message_doc},
    {"parse", (PyCFunction)AggFastPath_parse, METH_VARARGS, parse_doc},
    {"last_id", (PyCFunction)AggFastPath_last_id, METH_O, last_id_doc},
    {"set_last", (PyCFunction)(void (*)(void))AggFastPath_set_last, METH_FASTCALL,
     set_last_doc},
    {"close", (PyCFunction)AggFastPath_close, METH_NOARGS, close_doc},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef AggFastPath_members[] = {
    {"iter_open", T_INT, offsetof(AggFastPath, iter_open), 0,
     "1 while an event-loop iteration has published (stage the rest; the shell commits)"},
    {"frames", T_LONGLONG, offsetof(AggFastPath, frames), READONLY,
     "frames fully handled here (the shell adds them to frames_received)"},
    {"max_staged", T_LONGLONG, offsetof(AggFastPath, max_staged), READONLY,
     "the writer's max_staged when this was built"},
    {NULL, 0, 0, 0, NULL},
};

PyDoc_STRVAR(AggFastPath_doc,
"AggFastPath(routes, n_symbols, writer=None, fallback=None, intent_word=0,\n"
"            max_frame_bytes=sys.maxsize, time_mult=1000000)\n\n"
"routes: {b'btcusdt@aggTrade': symbol_id, ...}; writer: the ring writer (staging configured\n"
"with the stamp field); fallback(conn, payload, recv_time_ns, code): the Python handler;\n"
"time_mult: ns per unit of E (1000000 for ms, 1000 with timeUnit=MICROSECOND).");

static PyTypeObject AggFastPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pipeline._fastagg.AggFastPath",
    .tp_basicsize = sizeof(AggFastPath),
    .tp_dealloc = (destructor)AggFastPath_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)AggFastPath_traverse,
    .tp_clear = (inquiry)AggFastPath_clear,
    .tp_doc = AggFastPath_doc,
    .tp_methods = AggFastPath_methods,
    .tp_members = AggFastPath_members,
    .tp_init = (initproc)AggFastPath_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef fastagg_module = {
    PyModuleDef_HEAD_INIT, "pipeline._fastagg",
    "Compiled aggTrade frame -> ring slot fast path (see pipeline/fastpath.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__fastagg(void) {
    if (PyType_Ready(&AggFastPathType) < 0)
        return NULL;
    S_cursor = PyUnicode_InternFromString("_cursor");
    S_staged = PyUnicode_InternFromString("_staged");
    S_last_ns = PyUnicode_InternFromString("last_ns");
    S_first_pending = PyUnicode_InternFromString("first_pending");
    if (!S_cursor || !S_staged || !S_last_ns || !S_first_pending)
        return NULL;
    PyObject *m = PyModule_Create(&fastagg_module);
    if (!m)
        return NULL;
    Py_INCREF(&AggFastPathType);
    if (PyModule_AddObject(m, "AggFastPath", (PyObject *)&AggFastPathType) < 0) {
        Py_DECREF(&AggFastPathType);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *layout = Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "kind", OFF_KIND, "flags",
        OFF_FLAGS, "symbol", OFF_SYMBOL, "level", OFF_LEVEL, "_pad", OFF_PAD, "price", OFF_PRICE,
        "qty", OFF_QTY, "bid_price", OFF_BID_PRICE, "trade_id", OFF_TRADE_ID, "aux_id",
        OFF_AUX_ID, "event_time_ns", OFF_EVENT_TIME, "recv_time_ns", OFF_RECV_TIME,
        "publish_time_ns", OFF_PUBLISH_TIME);
    if (!layout || PyModule_AddObject(m, "LAYOUT", layout) < 0) {
        Py_XDECREF(layout);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "RECORD_BYTES", RECORD_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "KIND_AGG_TRADE", KIND_AGG_TRADE) < 0 ||
        PyModule_AddIntConstant(m, "FLAG_BUYER_IS_MAKER", FLAG_BUYER_IS_MAKER) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
