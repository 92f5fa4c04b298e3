/*
 * pipeline.binance._sbe: the compiled twin of pipeline/binance/sbe.py's SbeDecoder.
 *
 * Why: the pure-Python decoder spends most of its CPU per event in struct unpacking, tuple
 * building and one int/int division per number; here the frame is read at fixed offsets with
 * little-endian loads and the records are built directly. The Python decoder stays the
 * reference: this file must return EXACTLY what SbeDecoder.decode returns for every input (the
 * same tags, record tuples, DepthDiff/DepthPartial objects, the same skip reason with the same
 * check order when a frame has several faults, and other_version_frames counted alike);
 * tests/test_sbe_compiled.py fuzzes both against each other.
 *
 * Boundary: the C code imports no Python module. pipeline/binance/sbe.py (make_decoder) passes
 * in everything Python-side it needs: the symbol table (wire bytes -> ring symbol id), the
 * result tags, the record kinds/flags, the skip-reason strings, the DepthDiff/DepthPartial
 * classes, and the reference decoder's decode as the fallback for what this file does not take
 * (text frames, bytes subclasses, buffers that are not 1-byte, 1-dimensional and contiguous).
 *
 * Numbers: mantissa * 10^exponent as Python computes it. For exponent < 0 Python divides two
 * ints (correctly rounded); (double)m / 1e{k} is the same double when m is exact as a double
 * (|m| <= 2^53) and 10^k is (k <= 22): both operands exact, and IEEE division rounds once. Any
 * other case (larger mantissa, exponent >= 0) goes through PyLong arithmetic, so it is the very
 * computation Python does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"
#include <float.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "SBE frames are little-endian and this decoder loads them natively: add byte swaps first"
#endif
#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "the exact division needs double arithmetic without excess precision (SSE2, not x87)"
#endif

/* the interface pipeline/binance/sbe.py drives (checked there before use) */
#define API_VERSION 2

/* ---- the schema (stream_1_0.xml), as in sbe.py ---- */
#define SCHEMA_ID 1
#define SCHEMA_VERSION 0
#define T_TRADES 10000
#define T_BEST_BID_ASK 10001
#define T_DEPTH_SNAPSHOT 10002
#define T_DEPTH_DIFF 10003
#define HEADER_LEN 8
#define TRADES_BLOCK_LEN 18      /* eventTime, transactTime, priceExponent, qtyExponent */
#define BEST_BID_ASK_BLOCK_LEN 50 /* eventTime, bookUpdateId, pExp, qExp, 4 x mantissa */
#define DEPTH_SNAPSHOT_BLOCK_LEN 18 /* eventTime, bookUpdateId, pExp, qExp */
#define DEPTH_DIFF_BLOCK_LEN 26  /* eventTime, firstBookUpdateId, lastBookUpdateId, pExp, qExp */
#define GROUP_SIZE_LEN 6         /* u16 blockLength, u32 numInGroup */
#define GROUP_SIZE16_LEN 4       /* u16 blockLength, u16 numInGroup */
#define TRADE_ENTRY_LEN 25       /* id, price, qty, isBuyerMaker */
#define LEVEL_ENTRY_LEN 16       /* price, qty */
#define MAX_EXPONENT 18
#define US_TO_NS 1000
#define MAX_US (INT64_MAX / US_TO_NS)
#define EXACT_MANTISSA (1LL << 53)

/* skip reasons, in the order sbe.py's make_decoder passes them (COMPILED_REASONS) */
enum { R_TRUNCATED, R_WRONG_SCHEMA, R_UNKNOWN_TEMPLATE, R_SHORT_BLOCK, R_GROUP_OVERRUN,
       R_BAD_EXPONENT, R_BAD_SYMBOL, R_UNKNOWN_SYMBOL, R_BAD_NUMBER, R_OVERSIZED, N_REASONS };
/* result tags, likewise */
enum { G_TRADES, G_BOOK_TICKER, G_DEPTH_PARTIAL, G_DEPTH_DIFF, G_SKIP, N_TAGS };

static const double POW10[MAX_EXPONENT + 1] = {
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18};

static inline uint16_t ld_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline int64_t ld_i64(const uint8_t *p) { int64_t v; memcpy(&v, p, 8); return v; }

/* ---- symbol table: wire bytes -> ring symbol id (open addressing; the same answers as the
 * reference's dict.get on the raw bytes, without making a bytes object per frame) ---- */
typedef struct {
    uint8_t len;
    uint8_t used;
    uint8_t bytes[255];
    PyObject *sid; /* the dict's value, returned as is */
} SymbolSlot;

typedef struct {
    PyObject_HEAD
    SymbolSlot *slots;
    size_t mask;
    Py_ssize_t max_frame_bytes;
    long long other_version_frames;
    PyObject *fallback;      /* the reference decoder's decode(frame, recv_time_ns) */
    PyObject *depth_diff;    /* pipeline.binance.streams.DepthDiff */
    PyObject *depth_partial; /* pipeline.binance.streams.DepthPartial */
    PyObject *tags[N_TAGS];
    PyObject *skips[N_REASONS]; /* prebuilt (SKIP, reason) results */
    PyObject *kind_trade, *kind_book_ticker, *flag_maker, *zero, *zero_f;
    PyObject *pow10[MAX_EXPONENT + 1]; /* 10**k as Python ints, for the slow path */
} SbeDecoder;

static uint64_t fnv1a(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static PyObject *symbol_lookup(SbeDecoder *self, const uint8_t *p, size_t n) {
    size_t i = (size_t)fnv1a(p, n) & self->mask;
    for (;;) {
        SymbolSlot *s = &self->slots[i];
        if (!s->used)
            return NULL;
        if (s->len == n && memcmp(s->bytes, p, n) == 0)
            return s->sid;
        i = (i + 1) & self->mask;
    }
}

static int build_symbols(SbeDecoder *self, PyObject *sid_by_symbol) {
    if (!PyDict_Check(sid_by_symbol)) {
        PyErr_SetString(PyExc_TypeError, "sid_by_symbol must be a dict of bytes -> int");
        return -1;
    }
    size_t size = 8;
    while (size < 2 * (size_t)PyDict_GET_SIZE(sid_by_symbol) + 1)
        size <<= 1;
    self->slots = PyMem_Calloc(size, sizeof(SymbolSlot));
    if (!self->slots) {
        PyErr_NoMemory();
        return -1;
    }
    self->mask = size - 1;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(sid_by_symbol, &pos, &key, &value)) {
        /* a key the wire cannot carry (longer than a u8 length) can never match: left out */
        if (!PyBytes_CheckExact(key)) {
            PyErr_SetString(PyExc_TypeError, "sid_by_symbol keys must be bytes");
            return -1;
        }
        Py_ssize_t n = PyBytes_GET_SIZE(key);
        if (n > 255)
            continue;
        const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(key);
        size_t i = (size_t)fnv1a(p, (size_t)n) & self->mask;
        while (self->slots[i].used)
            i = (i + 1) & self->mask;
        SymbolSlot *s = &self->slots[i];
        s->used = 1;
        s->len = (uint8_t)n;
        memcpy(s->bytes, p, (size_t)n);
        Py_INCREF(value);
        s->sid = value;
    }
    return 0;
}

/* ---- decoding: each step returns a reason index on failure (-1: a Python error is set) ---- */
#define OK (-2)

typedef struct {
    const uint8_t *b;
    Py_ssize_t n;
    PyObject *recv; /* recv_time_ns as given: records carry the very object */
} Frame;

/* mantissa * 10^exp as the float Python's decimal_value gives (exp already in -18..18) */
static PyObject *decimal_value(SbeDecoder *self, int64_t m, int exp) {
    if (exp < 0 && m <= EXACT_MANTISSA && m >= -EXACT_MANTISSA)
        return PyFloat_FromDouble((double)m / POW10[-exp]);
    PyObject *mant = PyLong_FromLongLong(m);
    if (!mant)
        return NULL;
    PyObject *out;
    if (exp < 0) {
        out = PyNumber_TrueDivide(mant, self->pow10[-exp]);
    } else {
        PyObject *prod = PyNumber_Multiply(mant, self->pow10[exp]);
        out = prod ? PyNumber_Float(prod) : NULL;
        Py_XDECREF(prod);
    }
    Py_DECREF(mant);
    return out;
}

/* sbe.py _block: the fixed block holds our fields and the frame holds the block */
static inline int check_block(const Frame *f, unsigned block_len, unsigned need) {
    if (block_len < need)
        return R_SHORT_BLOCK;
    if (HEADER_LEN + (Py_ssize_t)block_len > f->n)
        return R_TRUNCATED;
    return OK;
}

/* sbe.py _group: (first entry offset, entry length, count), every entry inside the frame */
static inline int read_group(const Frame *f, Py_ssize_t off, int wide, unsigned min_entry,
                             Py_ssize_t *first, Py_ssize_t *entry_len, Py_ssize_t *count) {
    Py_ssize_t end = off + (wide ? GROUP_SIZE_LEN : GROUP_SIZE16_LEN);
    if (end > f->n)
        return R_TRUNCATED;
    uint64_t len = ld_u16(f->b + off);
    uint64_t cnt = wide ? ld_u32(f->b + off + 2) : ld_u16(f->b + off + 2);
    if (len < min_entry)
        return R_SHORT_BLOCK;
    /* at most 65535 * (2^32 - 1) < 2^48: no overflow */
    if ((uint64_t)end + cnt * len > (uint64_t)f->n)
        return R_GROUP_OVERRUN;
    *first = end;
    *entry_len = (Py_ssize_t)len;
    *count = (Py_ssize_t)cnt;
    return OK;
}

/* sbe.py _symbol_id: the var-length symbol at off -> ring symbol id (a borrowed reference) */
static int read_symbol(SbeDecoder *self, const Frame *f, Py_ssize_t off, PyObject **sid) {
    if (off >= f->n)
        return R_TRUNCATED;
    size_t len = f->b[off];
    if (off + 1 + (Py_ssize_t)len > f->n)
        return R_TRUNCATED;
    const uint8_t *p = f->b + off + 1;
    *sid = symbol_lookup(self, p, len);
    if (*sid)
        return OK;
    /* error path only: say why */
    PyObject *text = PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)len, "strict");
    if (!text) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            return -1;
        PyErr_Clear();
        return R_BAD_SYMBOL;
    }
    Py_DECREF(text);
    return len == 0 ? R_BAD_SYMBOL : R_UNKNOWN_SYMBOL;
}

static inline int check_exponents(int pexp, int qexp) {
    if (pexp < -MAX_EXPONENT || pexp > MAX_EXPONENT || qexp < -MAX_EXPONENT ||
        qexp > MAX_EXPONENT)
        return R_BAD_EXPONENT;
    return OK;
}

static PyObject *result(SbeDecoder *self, int tag, PyObject *value) {
    if (!value)
        return NULL;
    PyObject *out = PyTuple_New(2);
    if (!out) {
        Py_DECREF(value);
        return NULL;
    }
    Py_INCREF(self->tags[tag]);
    PyTuple_SET_ITEM(out, 0, self->tags[tag]);
    PyTuple_SET_ITEM(out, 1, value);
    return out;
}

/* a 15-field record tuple (records.py TICK_DTYPE order, without publish_time_ns); steals the
 * four floats, the two ids and the event time */
static PyObject *record(SbeDecoder *self, PyObject *kind, PyObject *flags, PyObject *sid,
                        PyObject *price, PyObject *qty, PyObject *bp, PyObject *bq,
                        PyObject *ap, PyObject *aq, PyObject *id, PyObject *ev_ns,
                        PyObject *recv) {
    PyObject *t = PyTuple_New(15);
    if (!t || !price || !qty || !bp || !bq || !ap || !aq || !id || !ev_ns) {
        Py_XDECREF(t);
        Py_XDECREF(price);
        Py_XDECREF(qty);
        Py_XDECREF(bp);
        Py_XDECREF(bq);
        Py_XDECREF(ap);
        Py_XDECREF(aq);
        Py_XDECREF(id);
        Py_XDECREF(ev_ns);
        return NULL;
    }
    PyObject *zero = self->zero;
    Py_INCREF(kind);
    PyTuple_SET_ITEM(t, 0, kind);
    Py_INCREF(flags);
    PyTuple_SET_ITEM(t, 1, flags);
    Py_INCREF(sid);
    PyTuple_SET_ITEM(t, 2, sid);
    Py_INCREF(zero);
    PyTuple_SET_ITEM(t, 3, zero);
    Py_INCREF(zero);
    PyTuple_SET_ITEM(t, 4, zero);
    PyTuple_SET_ITEM(t, 5, price);
    PyTuple_SET_ITEM(t, 6, qty);
    PyTuple_SET_ITEM(t, 7, bp);
    PyTuple_SET_ITEM(t, 8, bq);
    PyTuple_SET_ITEM(t, 9, ap);
    PyTuple_SET_ITEM(t, 10, aq);
    PyTuple_SET_ITEM(t, 11, id);
    Py_INCREF(zero);
    PyTuple_SET_ITEM(t, 12, zero);
    PyTuple_SET_ITEM(t, 13, ev_ns);
    Py_INCREF(recv);
    PyTuple_SET_ITEM(t, 14, recv);
    return t;
}

static inline PyObject *zero_f(SbeDecoder *self) {
    Py_INCREF(self->zero_f);
    return self->zero_f;
}

#define TRY(expr)                                                                              \
    do {                                                                                       \
        int r_ = (expr);                                                                       \
        if (r_ != OK)                                                                          \
            return r_;                                                                         \
    } while (0)

/* each template: OK with *out set (a new reference), a reason index, or -1 (error set) */
static int decode_trades(SbeDecoder *self, const Frame *f, unsigned block_len, PyObject **out) {
    TRY(check_block(f, block_len, TRADES_BLOCK_LEN));
    const uint8_t *blk = f->b + HEADER_LEN;
    int64_t ev_us = ld_i64(blk);
    int pexp = (int8_t)blk[16], qexp = (int8_t)blk[17];
    Py_ssize_t off, entry_len, count;
    TRY(read_group(f, HEADER_LEN + block_len, 1, TRADE_ENTRY_LEN, &off, &entry_len, &count));
    PyObject *sid;
    TRY(read_symbol(self, f, off + count * entry_len, &sid));
    TRY(check_exponents(pexp, qexp));
    if (ev_us < 0 || ev_us > MAX_US)
        return R_BAD_NUMBER;
    /* every check first (the reference raises BAD_NUMBER for any bad trade), then the records */
    for (Py_ssize_t i = 0; i < count; i++) {
        const uint8_t *e = f->b + off + i * entry_len;
        if (ld_i64(e) < 0 || ld_i64(e + 8) < 0 || ld_i64(e + 16) < 0 || e[24] > 1)
            return R_BAD_NUMBER;
    }
    PyObject *list = PyList_New(count);
    if (!list)
        return -1;
    PyObject *ev_ns = NULL;
    if (count) {
        ev_ns = PyLong_FromLongLong(ev_us * US_TO_NS);
        if (!ev_ns) {
            Py_DECREF(list);
            return -1;
        }
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        const uint8_t *e = f->b + off + i * entry_len;
        Py_INCREF(ev_ns);
        PyObject *rec = record(
            self, self->kind_trade, e[24] ? self->flag_maker : self->zero, sid,
            decimal_value(self, ld_i64(e + 8), pexp), decimal_value(self, ld_i64(e + 16), qexp),
            zero_f(self), zero_f(self), zero_f(self), zero_f(self),
            PyLong_FromLongLong(ld_i64(e)), ev_ns, f->recv);
        if (!rec) {
            Py_DECREF(ev_ns);
            Py_DECREF(list);
            return -1;
        }
        PyList_SET_ITEM(list, i, rec);
    }
    Py_XDECREF(ev_ns);
    *out = result(self, G_TRADES, list);
    return *out ? OK : -1;
}

static int decode_best_bid_ask(SbeDecoder *self, const Frame *f, unsigned block_len,
                               PyObject **out) {
    TRY(check_block(f, block_len, BEST_BID_ASK_BLOCK_LEN));
    const uint8_t *blk = f->b + HEADER_LEN;
    int64_t ev_us = ld_i64(blk), uid = ld_i64(blk + 8);
    int pexp = (int8_t)blk[16], qexp = (int8_t)blk[17];
    int64_t bid = ld_i64(blk + 18), bid_q = ld_i64(blk + 26), ask = ld_i64(blk + 34),
            ask_q = ld_i64(blk + 42);
    PyObject *sid;
    TRY(read_symbol(self, f, HEADER_LEN + block_len, &sid));
    TRY(check_exponents(pexp, qexp));
    if (ev_us < 0 || ev_us > MAX_US || uid < 0 || bid < 0 || bid_q < 0 || ask < 0 || ask_q < 0)
        return R_BAD_NUMBER;
    PyObject *rec = record(self, self->kind_book_ticker, self->zero, sid, zero_f(self),
                           zero_f(self), decimal_value(self, bid, pexp),
                           decimal_value(self, bid_q, qexp), decimal_value(self, ask, pexp),
                           decimal_value(self, ask_q, qexp), PyLong_FromLongLong(uid),
                           PyLong_FromLongLong(ev_us * US_TO_NS), f->recv);
    *out = result(self, G_BOOK_TICKER, rec);
    return *out ? OK : -1;
}

/* one side's levels as a list of (price, qty) tuples; R_BAD_NUMBER for a negative mantissa */
static int levels(SbeDecoder *self, const Frame *f, Py_ssize_t off, Py_ssize_t entry_len,
                  Py_ssize_t count, int pexp, int qexp, PyObject **out) {
    for (Py_ssize_t i = 0; i < count; i++) {
        const uint8_t *e = f->b + off + i * entry_len;
        if (ld_i64(e) < 0 || ld_i64(e + 8) < 0)
            return R_BAD_NUMBER;
    }
    PyObject *list = PyList_New(count);
    if (!list)
        return -1;
    for (Py_ssize_t i = 0; i < count; i++) {
        const uint8_t *e = f->b + off + i * entry_len;
        PyObject *p = decimal_value(self, ld_i64(e), pexp);
        PyObject *q = p ? decimal_value(self, ld_i64(e + 8), qexp) : NULL;
        PyObject *lv = q ? PyTuple_New(2) : NULL;
        if (!lv) {
            Py_XDECREF(p);
            Py_XDECREF(q);
            Py_DECREF(list);
            return -1;
        }
        PyTuple_SET_ITEM(lv, 0, p);
        PyTuple_SET_ITEM(lv, 1, q);
        PyList_SET_ITEM(list, i, lv);
    }
    *out = list;
    return OK;
}

/* sbe.py _depth_sides: the bids and asks groups from off, then the symbol */
static int depth_sides(SbeDecoder *self, const Frame *f, Py_ssize_t off, int pexp, int qexp,
                       PyObject **sid, PyObject **bids, PyObject **asks) {
    Py_ssize_t b_off, b_len, b_cnt, a_off, a_len, a_cnt;
    TRY(read_group(f, off, 0, LEVEL_ENTRY_LEN, &b_off, &b_len, &b_cnt));
    TRY(read_group(f, b_off + b_cnt * b_len, 0, LEVEL_ENTRY_LEN, &a_off, &a_len, &a_cnt));
    TRY(read_symbol(self, f, a_off + a_cnt * a_len, sid));
    TRY(check_exponents(pexp, qexp));
    TRY(levels(self, f, b_off, b_len, b_cnt, pexp, qexp, bids));
    int r = levels(self, f, a_off, a_len, a_cnt, pexp, qexp, asks);
    if (r != OK)
        Py_CLEAR(*bids);
    return r;
}

static int decode_depth(SbeDecoder *self, const Frame *f, unsigned block_len, int diff,
                        PyObject **out) {
    TRY(check_block(f, block_len, diff ? DEPTH_DIFF_BLOCK_LEN : DEPTH_SNAPSHOT_BLOCK_LEN));
    const uint8_t *blk = f->b + HEADER_LEN;
    int64_t ev_us = ld_i64(blk), first = ld_i64(blk + 8), last = diff ? ld_i64(blk + 16) : 0;
    int ex = diff ? 24 : 16;
    int pexp = (int8_t)blk[ex], qexp = (int8_t)blk[ex + 1];
    PyObject *sid, *bids = NULL, *asks = NULL;
    TRY(depth_sides(self, f, HEADER_LEN + block_len, pexp, qexp, &sid, &bids, &asks));
    if (ev_us < 0 || ev_us > MAX_US || first < 0 || (diff && first > last)) {
        Py_DECREF(bids);
        Py_DECREF(asks);
        return R_BAD_NUMBER;
    }
    PyObject *args[6];
    PyObject *value = NULL;
    if (diff) {
        /* DepthDiff(symbol, first_id, last_id, event_time_ns, recv_time_ns, bids, asks) */
        args[0] = PyLong_FromLongLong(first);
        args[1] = PyLong_FromLongLong(last);
        args[2] = PyLong_FromLongLong(ev_us * US_TO_NS);
        if (args[0] && args[1] && args[2]) {
            PyObject *call[7] = {sid, args[0], args[1], args[2], f->recv, bids, asks};
            value = PyObject_Vectorcall(self->depth_diff, call, 7, NULL);
        }
        Py_XDECREF(args[0]);
        Py_XDECREF(args[1]);
        Py_XDECREF(args[2]);
    } else {
        /* DepthPartial(symbol, last_update_id, recv_time_ns, bids, asks, event_time_ns) */
        args[0] = PyLong_FromLongLong(first);
        args[1] = PyLong_FromLongLong(ev_us * US_TO_NS);
        if (args[0] && args[1]) {
            PyObject *call[6] = {sid, args[0], f->recv, bids, asks, args[1]};
            value = PyObject_Vectorcall(self->depth_partial, call, 6, NULL);
        }
        Py_XDECREF(args[0]);
        Py_XDECREF(args[1]);
    }
    Py_DECREF(bids);
    Py_DECREF(asks);
    *out = result(self, diff ? G_DEPTH_DIFF : G_DEPTH_PARTIAL, value);
    return *out ? OK : -1;
}

/* sbe.py decode_or_raise, on a frame's bytes */
static int decode_bytes(SbeDecoder *self, const Frame *f, PyObject **out) {
    if (f->n < HEADER_LEN)
        return R_TRUNCATED;
    unsigned block_len = ld_u16(f->b), template = ld_u16(f->b + 2);
    if (ld_u16(f->b + 4) != SCHEMA_ID)
        return R_WRONG_SCHEMA;
    if (template < T_TRADES || template > T_DEPTH_DIFF)
        return R_UNKNOWN_TEMPLATE;
    if (ld_u16(f->b + 6) != SCHEMA_VERSION)
        self->other_version_frames++;
    switch (template) {
    case T_TRADES:
        return decode_trades(self, f, block_len, out);
    case T_BEST_BID_ASK:
        return decode_best_bid_ask(self, f, block_len, out);
    case T_DEPTH_SNAPSHOT:
        return decode_depth(self, f, block_len, 0, out);
    default:
        return decode_depth(self, f, block_len, 1, out);
    }
}

static PyObject *skip(SbeDecoder *self, int reason) {
    Py_INCREF(self->skips[reason]);
    return self->skips[reason];
}

static PyObject *finish(SbeDecoder *self, int r, PyObject *out) {
    if (r == OK)
        return out;
    if (r < 0)
        return NULL;
    return skip(self, r);
}

static PyObject *SbeDecoder_decode(SbeDecoder *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "decode(frame, recv_time_ns) takes 2 arguments");
        return NULL;
    }
    if (!self->slots) { /* Decoder.__new__ without __init__: nothing to decode with */
        PyErr_SetString(PyExc_RuntimeError, "Decoder is not initialised");
        return NULL;
    }
    PyObject *frame = args[0];
    Frame f = {NULL, 0, args[1]};
    PyObject *out = NULL;
    if (PyBytes_CheckExact(frame)) {
        f.b = (const uint8_t *)PyBytes_AS_STRING(frame);
        f.n = PyBytes_GET_SIZE(frame);
        if (f.n > self->max_frame_bytes)
            return skip(self, R_OVERSIZED);
        int r = decode_bytes(self, &f, &out); /* before reading out: argument order is free */
        return finish(self, r, out);
    }
    if (PyByteArray_CheckExact(frame) || PyMemoryView_Check(frame) /* not subclassable */) {
        Py_buffer view;
        if (PyObject_GetBuffer(frame, &view, PyBUF_FULL_RO) < 0) {
            PyErr_Clear(); /* e.g. a released memoryview: the reference decides */
            return PyObject_Vectorcall(self->fallback, args, 2, NULL);
        }
        /* the reference compares len(frame) (items, not bytes) and copies with tobytes(): the
         * same bytes only for one-byte items in one contiguous dimension */
        if (view.ndim != 1 || view.itemsize != 1 || !PyBuffer_IsContiguous(&view, 'C')) {
            PyBuffer_Release(&view);
            return PyObject_Vectorcall(self->fallback, args, 2, NULL);
        }
        f.b = (const uint8_t *)view.buf;
        f.n = view.len;
        int r = f.n > self->max_frame_bytes ? R_OVERSIZED : decode_bytes(self, &f, &out);
        PyBuffer_Release(&view);
        return finish(self, r, out);
    }
    /* text frames (JSON control replies) and anything unusual: the reference */
    return PyObject_Vectorcall(self->fallback, args, 2, NULL);
}

/* ---- the type ---- */
static int SbeDecoder_traverse(SbeDecoder *self, visitproc visit, void *arg) {
    Py_VISIT(self->fallback);
    Py_VISIT(self->depth_diff);
    Py_VISIT(self->depth_partial);
    return 0;
}

static int SbeDecoder_clear(SbeDecoder *self) {
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->depth_diff);
    Py_CLEAR(self->depth_partial);
    for (int i = 0; i < N_TAGS; i++)
        Py_CLEAR(self->tags[i]);
    for (int i = 0; i < N_REASONS; i++)
        Py_CLEAR(self->skips[i]);
    Py_CLEAR(self->kind_trade);
    Py_CLEAR(self->kind_book_ticker);
    Py_CLEAR(self->flag_maker);
    Py_CLEAR(self->zero);
    Py_CLEAR(self->zero_f);
    for (int i = 0; i <= MAX_EXPONENT; i++)
        Py_CLEAR(self->pow10[i]);
    if (self->slots) {
        for (size_t i = 0; i <= self->mask; i++)
            Py_XDECREF(self->slots[i].sid);
        PyMem_Free(self->slots);
        self->slots = NULL;
    }
    return 0;
}

static void SbeDecoder_dealloc(SbeDecoder *self) {
    PyObject_GC_UnTrack(self);
    SbeDecoder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int SbeDecoder_init(SbeDecoder *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"sid_by_symbol", "max_frame_bytes", "fallback", "depth_diff",
                             "depth_partial", "tags", "reasons", "kinds", NULL};
    PyObject *sid_by_symbol, *fallback, *depth_diff, *depth_partial, *tags, *reasons, *kinds;
    Py_ssize_t max_frame_bytes;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OnOOOO!O!O!", kwlist, &sid_by_symbol,
                                     &max_frame_bytes, &fallback, &depth_diff, &depth_partial,
                                     &PyTuple_Type, &tags, &PyTuple_Type, &reasons,
                                     &PyTuple_Type, &kinds))
        return -1;
    if (self->slots) {
        PyErr_SetString(PyExc_RuntimeError, "Decoder is already initialised");
        return -1;
    }
    if (PyTuple_GET_SIZE(tags) != N_TAGS || PyTuple_GET_SIZE(reasons) != N_REASONS ||
        PyTuple_GET_SIZE(kinds) != 3) {
        PyErr_Format(PyExc_ValueError,
                     "tags must hold %d items (TRADES, BOOK_TICKER, DEPTH_PARTIAL, DEPTH_DIFF, "
                     "SKIP), reasons %d, kinds 3 (trade kind, book ticker kind, maker flag)",
                     N_TAGS, N_REASONS);
        return -1;
    }
    if (!PyCallable_Check(fallback) || !PyCallable_Check(depth_diff) ||
        !PyCallable_Check(depth_partial)) {
        PyErr_SetString(PyExc_TypeError, "fallback, depth_diff and depth_partial must be callable");
        return -1;
    }
    if (build_symbols(self, sid_by_symbol) < 0)
        return -1;
    self->max_frame_bytes = max_frame_bytes;
    Py_INCREF(fallback);
    self->fallback = fallback;
    Py_INCREF(depth_diff);
    self->depth_diff = depth_diff;
    Py_INCREF(depth_partial);
    self->depth_partial = depth_partial;
    for (int i = 0; i < N_TAGS; i++) {
        self->tags[i] = PyTuple_GET_ITEM(tags, i);
        Py_INCREF(self->tags[i]);
    }
    for (int i = 0; i < N_REASONS; i++) {
        self->skips[i] = PyTuple_Pack(2, self->tags[G_SKIP], PyTuple_GET_ITEM(reasons, i));
        if (!self->skips[i])
            return -1;
    }
    self->kind_trade = PyTuple_GET_ITEM(kinds, 0);
    self->kind_book_ticker = PyTuple_GET_ITEM(kinds, 1);
    self->flag_maker = PyTuple_GET_ITEM(kinds, 2);
    Py_INCREF(self->kind_trade);
    Py_INCREF(self->kind_book_ticker);
    Py_INCREF(self->flag_maker);
    self->zero = PyLong_FromLong(0);
    self->zero_f = PyFloat_FromDouble(0.0);
    if (!self->zero || !self->zero_f)
        return -1;
    unsigned long long p = 1;
    for (int i = 0; i <= MAX_EXPONENT; i++, p *= 10) {
        self->pow10[i] = PyLong_FromUnsignedLongLong(p);
        if (!self->pow10[i])
            return -1;
    }
    return 0;
}

static PyMethodDef SbeDecoder_methods[] = {
    {"decode", (PyCFunction)(void (*)(void))SbeDecoder_decode, METH_FASTCALL,
     "decode(frame, recv_time_ns) -> (tag, value): SbeDecoder.decode's contract, compiled."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef SbeDecoder_members[] = {
    {"compiled_other_version_frames", T_LONGLONG,
     offsetof(SbeDecoder, other_version_frames), 0,
     "frames this decoder decoded although their schema version is not this schema's"},
    {"max_frame_bytes", T_PYSSIZET, offsetof(SbeDecoder, max_frame_bytes), READONLY,
     "frames longer than this are skipped as OVERSIZED"},
    {"fallback", T_OBJECT, offsetof(SbeDecoder, fallback), READONLY,
     "the reference decoder's decode, for what this one does not take"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject SbeDecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pipeline.binance._sbe.Decoder",
    .tp_basicsize = sizeof(SbeDecoder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)SbeDecoder_dealloc,
    .tp_traverse = (traverseproc)SbeDecoder_traverse,
    .tp_clear = (inquiry)SbeDecoder_clear,
    .tp_doc = "The compiled SBE market-data decoder (see pipeline/binance/sbe.py make_decoder).",
    .tp_methods = SbeDecoder_methods,
    .tp_members = SbeDecoder_members,
    .tp_init = (initproc)SbeDecoder_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef sbe_module = {
    PyModuleDef_HEAD_INIT, "pipeline.binance._sbe",
    "Compiled twin of the SBE market-data decoder (see pipeline/binance/sbe.py).", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__sbe(void) {
    if (PyType_Ready(&SbeDecoderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&sbe_module);
    if (!m)
        return NULL;
    Py_INCREF(&SbeDecoderType);
    if (PyModule_AddObject(m, "Decoder", (PyObject *)&SbeDecoderType) < 0) {
        Py_DECREF(&SbeDecoderType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "API_VERSION", API_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
