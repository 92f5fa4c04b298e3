/* Compiled fast path of the ingest hot path: combined-stream frame -> ring slot, for the three
 * high-rate JSON streams (aggTrade, trade, bookTicker), and SBE frame -> ring slots for the two
 * high-rate SBE templates (trade, bestBidAsk: on_sbe_message, see "SBE" below).
 *
 * Why it exists: in pure Python the ingest process spent ~3.6 us of CPU per aggTrade frame
 * (typed JSON decode 1.3 us, building and packing the record tuple ~0.6 us, id tracking and
 * ring bookkeeping, picows' callback layer); the target is <= 2 us. This module does the common
 * case of the frame handler in one C call: parse the frame bytes, check the id against the
 * stream's state (aggTrade / trade: the next id of its symbol; bookTicker: a newer update id),
 * and write the record straight into its ring slot and publish it: intent word, record (with
 * its publish_time_ns), sequence stamp, cursor, as WriterCore.publish does, then a futex wake
 * if a reader sleeps on the cursor (pipeline/ipc/wake.py: one load when nobody does). Every
 * record is visible the moment it is written: a burst of frames from one socket read is not
 * held back until its last frame is decoded (a release store of the cursor costs nanoseconds
 * here, where the Python commit cost microseconds).
 *
 * A narrow boundary: this file reads and writes no attribute of any Python object. It is given
 * buffers and integers once (the ring's record slots, sequence stamps and header words, from
 * WriterCore.fast_path_view(), see FastPathView there for the protocol) and on each frame the
 * payload and its receive time; the batch it shares with the Python writer is in the ring
 * header (intent = cursor + staged), not in the writer object. The connection a frame came from
 * is an opaque token handed back to the Python fallback: its state (last frame time, first
 * frame seen) is Python's, kept by the fallback, which this path calls at least once per
 * connection and event-loop iteration (see on_message).
 *
 * Conservative by construction: it accepts only a strict subset of JSON (ASCII only, no string
 * escapes, `stream` before `data`, no nested values inside `data`, each required field exactly
 * once, prices/quantities as plain decimal strings, ids as non-negative integers of at most 18
 * digits, unused numbers without exponent). Anything else, and any id the state does not
 * expect (duplicates, gaps, the first frame of a symbol), is handed to the Python handler
 * untouched, which decides with the full decoder (tests check that every frame this path
 * accepts decodes to the same record bytes there).
 *
 * SBE: the pure-Python decoder (pipeline/binance/sbe.py, then Ingest.handle_sbe) spent ~1.5-2 us
 * per trade or bestBidAsk event; this reads the version-0 layout at fixed offsets and shares the
 * per-symbol id state of the JSON trade and bookTicker streams, so both wire formats publish one
 * id sequence. A trades event is taken whole or not at all (every id contiguous from the one
 * expected next, decided before the first record is written). The Python path stays the
 * reference (tests/test_fastpath_sbe.py fuzzes the two against each other).
 *
 * Floats: a decimal with <= 15 significant digits and <= 22 fractional digits is converted as
 * mantissa / 10^k, which is correctly rounded (both operands are exact doubles and IEEE division
 * rounds once), i.e. the same double as Python's float(); anything longer goes through
 * PyOS_string_to_double (also correctly rounded).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include "structmember.h"
#include <stdint.h>
#include <string.h>
#include <math.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the tick record layout is little-endian; this fast path writes native integers"
#endif

/* ---- the record layout it writes (pipeline/ipc/records.py TICK_DTYPE; checked at import time by
 * pipeline/marketdata/fastpath.py against the dtype, so a layout change cannot silently corrupt rings) -- */
#define OFF_KIND 0
#define OFF_FLAGS 1
#define OFF_SYMBOL 2
#define OFF_LEVEL 4
#define OFF_PAD 6
#define OFF_PRICE 8
#define OFF_QTY 16
#define OFF_BID_PRICE 24
#define OFF_BID_QTY 32
#define OFF_ASK_PRICE 40
#define OFF_ASK_QTY 48
#define OFF_TRADE_ID 56
#define OFF_AUX_ID 64
#define OFF_EVENT_TIME 72
#define OFF_RECV_TIME 80
#define OFF_PUBLISH_TIME 88
#define RECORD_BYTES 96
/* Bumped with every change of the Python-facing interface: pipeline/marketdata/fastpath.py refuses a build
 * of another version (an editable install not rebuilt after a pull) instead of failing on it. */
#define API_VERSION 6
#define KIND_AGG_TRADE 1
#define KIND_TRADE 2
#define KIND_BOOK_TICKER 3
#define N_KINDS 3
#define FLAG_BUYER_IS_MAKER 1

#define MAX_INT_DIGITS 18       /* < 2^63 without overflow checks */
#define MAX_DECIMAL_CHARS 40    /* longer price/qty strings go to the Python path */

/* ---- parsing ------------------------------------------------------------------------------ */

typedef struct {
    const char *p;
    const char *end;
} Cur;

/* What a frame carries, for any of the three kinds (unused fields stay 0). */
typedef struct {
    int kind;
    int64_t E, id, aux; /* event time (the frame's unit); a / t / u; l */
    int64_t event_ns;   /* the record's event_time_ns (0 for JSON bookTicker, which has none) */
    double price, qty, bid, bid_qty, ask, ask_qty;
    int maker;
} Tick;

static inline void skip_ws(Cur *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\n' || *c->p == '\r' || *c->p == '\t'))
        c->p++;
}

/* Whitespace, the character `ch`, whitespace; 0 if `ch` is not there. */
static inline int expect(Cur *c, char ch) {
    skip_ws(c);
    if (c->p >= c->end || *c->p != ch)
        return 0;
    c->p++;
    skip_ws(c);
    return 1;
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

/* A required field of a kind: its bit, how it is read, where it goes. */
enum { V_UINT, V_DEC, V_BOOL };
typedef struct {
    int bit, type;
    int64_t *i;
    double *d;
} Field;

static inline int field_of(int kind, char key, Tick *g, Field *f) {
    f->i = NULL;
    f->d = NULL;
    switch (kind) {
    case KIND_AGG_TRADE:
        switch (key) {
        case 'E': *f = (Field){1, V_UINT, &g->E, NULL}; return 1;
        case 'a': *f = (Field){2, V_UINT, &g->id, NULL}; return 1;
        case 'p': *f = (Field){4, V_DEC, NULL, &g->price}; return 1;
        case 'q': *f = (Field){8, V_DEC, NULL, &g->qty}; return 1;
        case 'l': *f = (Field){16, V_UINT, &g->aux, NULL}; return 1;
        case 'm': *f = (Field){32, V_BOOL, NULL, NULL}; return 1;
        }
        return 0;
    case KIND_TRADE:
        switch (key) {
        case 'E': *f = (Field){1, V_UINT, &g->E, NULL}; return 1;
        case 't': *f = (Field){2, V_UINT, &g->id, NULL}; return 1;
        case 'p': *f = (Field){4, V_DEC, NULL, &g->price}; return 1;
        case 'q': *f = (Field){8, V_DEC, NULL, &g->qty}; return 1;
        case 'm': *f = (Field){16, V_BOOL, NULL, NULL}; return 1;
        }
        return 0;
    default: /* KIND_BOOK_TICKER */
        switch (key) {
        case 'u': *f = (Field){1, V_UINT, &g->id, NULL}; return 1;
        case 'b': *f = (Field){2, V_DEC, NULL, &g->bid}; return 1;
        case 'B': *f = (Field){4, V_DEC, NULL, &g->bid_qty}; return 1;
        case 'a': *f = (Field){8, V_DEC, NULL, &g->ask}; return 1;
        case 'A': *f = (Field){16, V_DEC, NULL, &g->ask_qty}; return 1;
        }
        return 0;
    }
}

static const int REQUIRED[N_KINDS + 1] = {0, 63, 31, 31};

/* The payload object of one kind. */
static int parse_data(Cur *c, Tick *g, int64_t max_event) {
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
        Field f;
        int ok;
        skip_ws(c);
        if (!plain_string(c, &k, &kn) || !expect(c, ':'))
            return 0;
        if (kn == 1 && field_of(g->kind, k[0], g, &f)) {
            if (f.bit & seen)
                return 0; /* a required key twice: let the full decoder decide */
            seen |= f.bit;
            if (f.type == V_UINT) {
                ok = json_uint(c, f.i);
            } else if (f.type == V_DEC) {
                ok = decimal_string(c, f.d);
            } else {
                g->maker = literal(c, "true", 4);
                ok = g->maker || literal(c, "false", 5);
            }
        } else {
            ok = skip_scalar(c);
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
            if (seen != REQUIRED[g->kind])
                return 0;
            return g->kind == KIND_BOOK_TICKER || g->E <= max_event;
        }
        return 0;
    }
}

/* ---- routing: stream name -> symbol id (open addressing, FNV-1a) --------------------------- */

typedef struct {
    uint64_t hash;
    char *name; /* NULL: empty slot */
    Py_ssize_t len;
    int sid, kind;
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
    /* per (kind, symbol), index (kind - 1) * n_symbols + sid: the last id published (aggTrade
     * `a`, trade `t`, bookTicker `u`), valid while armed; armed = this path may publish the
     * next one (last + 1 for trades, anything newer for bookTicker) */
    int64_t *last;
    char *armed;
    PyObject *fallback;
    /* SBE (on_sbe_message): the wire symbol (upper-case bytes, as Binance sends it) -> symbol id
     * (kind unused); NULL: every SBE frame goes to sbe_fallback */
    Route *sbe_syms;
    Py_ssize_t sbe_mask;
    PyObject *sbe_fallback;
    /* the ring's record slots, sequence stamps and header (int64 words); have_bufs 0: parse
     * only, or closed */
    Py_buffer data, seqs, hdr;
    int have_bufs;
    int64_t mask, record_size, max_staged, cursor_word, intent_word, sleepers_word;
    long long wakes; /* futex wake calls: publishes that found a reader asleep */
    /* the connection (an opaque token) whose fallback was told about this event-loop iteration:
     * a frame of another one calls the fallback (which keeps per-connection state); cleared
     * whenever iter_open is set */
    PyObject *iter_conn;
    int64_t time_mult, max_event; /* ns per unit of E (timeUnit); E * time_mult fits in int64 */
    /* a bookTicker `u` more than this above the last one goes to the Python handler (its
     * far-id rule: one bogus id must not make every later update look old) */
    int64_t max_id_jump;
    Py_ssize_t max_frame_bytes;
    int iter_open;
    long long frames;
} TickFastPath;

static const Route *table_lookup(const Route *table, Py_ssize_t mask, const char *s,
                                 Py_ssize_t n) {
    uint64_t h = fnv1a(s, n);
    Py_ssize_t i = (Py_ssize_t)(h & (uint64_t)mask);
    for (;;) {
        const Route *r = &table[i];
        if (r->name == NULL)
            return NULL;
        if (r->hash == h && r->len == n && memcmp(r->name, s, (size_t)n) == 0)
            return r;
        i = (i + 1) & mask;
    }
}

static inline const Route *route_lookup(TickFastPath *self, const char *s, Py_ssize_t n) {
    return table_lookup(self->routes, self->route_mask, s, n);
}

/* Frame -> Tick and symbol id; 0 if this path does not take it. `stream` must come first (as
 * Binance sends it): the kind decides what the fields of `data` mean (`a` is an id in aggTrade
 * and a price in bookTicker), and a frame of a stream we do not take is declined unread. */
static int parse_frame(TickFastPath *self, const char *buf, Py_ssize_t n, Tick *g, int *sid) {
    Cur c = {buf, buf + n};
    const char *k, *name;
    Py_ssize_t kn, name_len;
    memset(g, 0, sizeof(*g));
    *sid = -1;
    if (!expect(&c, '{') || !plain_string(&c, &k, &kn) || kn != 6 ||
        memcmp(k, "stream", 6) != 0 || !expect(&c, ':') || !plain_string(&c, &name, &name_len))
        return 0;
    const Route *r = route_lookup(self, name, name_len);
    if (r == NULL)
        return 0;
    if (!expect(&c, ',') || !plain_string(&c, &k, &kn) || kn != 4 ||
        memcmp(k, "data", 4) != 0 || !expect(&c, ':'))
        return 0;
    g->kind = r->kind;
    if (!parse_data(&c, g, self->max_event) || !expect(&c, '}') || c.p != c.end)
        return 0;
    /* bookTicker has no event time: 0, as in the Python decoders */
    g->event_ns = g->kind == KIND_BOOK_TICKER ? 0 : g->E * self->time_mult;
    *sid = r->sid;
    return 1;
}

/* ---- SBE (stream_1_0.xml, schema id 1 version 0, little-endian): the two high-rate templates,
 * at this version's fixed offsets. The rules are pipeline/binance/sbe.py's (the reference); this
 * takes a strict subset of what it accepts: the exact block and entry lengths of version 0 (a
 * longer one from a newer version goes to Python, which skips by blockLength and counts it),
 * nothing after the symbol, both exponents in -18..0 and mantissas in 0..2^53 (so mantissa /
 * 10^k is one correctly rounded IEEE division of two exact doubles: the double CPython's
 * int / int gives; for exponent 0 it is the mantissa itself, exact, as float(m * 1) is: the
 * simulator sends 0 for symbols with integer step sizes), event times whose ns value fits an int64, and for trades a group of at
 * least one trade with contiguous ids. Anything else is declined before a byte is written. */
#define SBE_SCHEMA_ID 1
#define SBE_SCHEMA_VERSION 0
#define SBE_TRADES_TEMPLATE 10000
#define SBE_BEST_BID_ASK_TEMPLATE 10001
#define SBE_HEADER_BYTES 8
#define SBE_TRADES_BLOCK 18   /* eventTime i64, transactTime i64, priceExp i8, qtyExp i8 */
#define SBE_GROUP_BYTES 6     /* groupSizeEncoding: blockLength u16, numInGroup u32 */
#define SBE_TRADE_ENTRY 25    /* id i64, price i64, qty i64, isBuyerMaker u8 */
#define SBE_BBA_BLOCK 50      /* eventTime, bookUpdateId, pExp, qExp, bid, bidQty, ask, askQty */
#define SBE_MAX_EXPONENT 18   /* the reference's MAX_EXPONENT (and <= 22: POW10 is exact) */
#define SBE_MAX_MANTISSA (INT64_C(1) << 53)
#define SBE_MAX_US (INT64_MAX / 1000)

static inline uint16_t rd_u16(const unsigned char *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}
static inline uint32_t rd_u32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}
static inline int64_t rd_i64(const unsigned char *p) {
    int64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline int sbe_mantissa_ok(int64_t m) { return m >= 0 && m <= SBE_MAX_MANTISSA; }

/* What an SBE frame this path takes carries: a trades group (read again entry by entry when
 * it is written: `entries`, `count`) or one best bid/ask (`bba`). */
typedef struct {
    int kind, sid;
    int64_t first_id, last_id; /* trades: the group's ids; bestBidAsk: u (both) */
    int64_t event_ns;
    double pdiv, qdiv;
    const unsigned char *entries;
    Py_ssize_t count;
    Tick bba;
} SbeEvent;

/* The fixed exponents -> their divisors; 0 if either is outside -18..0 (Python decides). */
static inline int sbe_divisors(const unsigned char *p, SbeEvent *ev) {
    int pe = (int8_t)p[0], qe = (int8_t)p[1];
    if (pe > 0 || pe < -SBE_MAX_EXPONENT || qe > 0 || qe < -SBE_MAX_EXPONENT)
        return 0;
    ev->pdiv = POW10[-pe];
    ev->qdiv = POW10[-qe];
    return 1;
}

/* The var-length symbol at `off`, which must end the frame exactly -> symbol id; -1 if it is
 * not one of ours (or anything follows it). */
static inline int sbe_symbol(TickFastPath *self, const unsigned char *b, Py_ssize_t off,
                             Py_ssize_t n) {
    if (off >= n || off + 1 + (Py_ssize_t)b[off] != n)
        return -1;
    const Route *r = table_lookup(self->sbe_syms, self->sbe_mask, (const char *)b + off + 1,
                                  n - off - 1);
    return r ? r->sid : -1;
}

/* A trade entry of a group this path took -> its Tick (kind, id, price, qty, maker, time). */
static inline void sbe_trade_tick(const SbeEvent *ev, Py_ssize_t i, Tick *g) {
    const unsigned char *e = ev->entries + i * SBE_TRADE_ENTRY;
    memset(g, 0, sizeof(*g));
    g->kind = KIND_TRADE;
    g->id = rd_i64(e);
    g->price = (double)rd_i64(e + 8) / ev->pdiv;
    g->qty = (double)rd_i64(e + 16) / ev->qdiv;
    g->maker = e[24];
    g->event_ns = ev->event_ns;
}

/* Frame -> SbeEvent; 0 if this path does not take it (see above), ignoring the id state. */
static int parse_sbe(TickFastPath *self, const char *buf, Py_ssize_t n, SbeEvent *ev) {
    const unsigned char *b = (const unsigned char *)buf;
    if (self->sbe_syms == NULL || n < SBE_HEADER_BYTES || rd_u16(b + 4) != SBE_SCHEMA_ID ||
        rd_u16(b + 6) != SBE_SCHEMA_VERSION)
        return 0;
    uint16_t block_len = rd_u16(b), template = rd_u16(b + 2);
    const unsigned char *blk = b + SBE_HEADER_BYTES;
    if (template == SBE_TRADES_TEMPLATE) {
        Py_ssize_t group = SBE_HEADER_BYTES + SBE_TRADES_BLOCK;
        if (block_len != SBE_TRADES_BLOCK || n < group + SBE_GROUP_BYTES)
            return 0;
        int64_t ev_us = rd_i64(blk);
        if (ev_us < 0 || ev_us > SBE_MAX_US || !sbe_divisors(blk + 16, ev))
            return 0;
        Py_ssize_t count = (Py_ssize_t)rd_u32(b + group + 2); /* < 2^32: no overflow below */
        if (rd_u16(b + group) != SBE_TRADE_ENTRY || count < 1 ||
            group + SBE_GROUP_BYTES + count * SBE_TRADE_ENTRY >= n)
            return 0;
        const unsigned char *e = b + group + SBE_GROUP_BYTES;
        int sid = sbe_symbol(self, b, group + SBE_GROUP_BYTES + count * SBE_TRADE_ENTRY, n);
        if (sid < 0)
            return 0;
        int64_t prev = -1;
        for (Py_ssize_t i = 0; i < count; i++, e += SBE_TRADE_ENTRY) {
            int64_t id = rd_i64(e);
            /* id >= 0, so id - 1 cannot overflow */
            if (id < 0 || (i > 0 && id - 1 != prev) || !sbe_mantissa_ok(rd_i64(e + 8)) ||
                !sbe_mantissa_ok(rd_i64(e + 16)) || e[24] > 1)
                return 0;
            prev = id;
        }
        ev->kind = KIND_TRADE;
        ev->sid = sid;
        ev->entries = b + group + SBE_GROUP_BYTES;
        ev->count = count;
        ev->first_id = rd_i64(ev->entries);
        ev->last_id = prev;
        ev->event_ns = ev_us * 1000;
        return 1;
    }
    if (template == SBE_BEST_BID_ASK_TEMPLATE) {
        if (block_len != SBE_BBA_BLOCK)
            return 0;
        int sid = sbe_symbol(self, b, SBE_HEADER_BYTES + SBE_BBA_BLOCK, n);
        if (sid < 0)
            return 0;
        int64_t ev_us = rd_i64(blk), u = rd_i64(blk + 8);
        int64_t bid = rd_i64(blk + 18), bid_q = rd_i64(blk + 26), ask = rd_i64(blk + 34),
                ask_q = rd_i64(blk + 42);
        if (ev_us < 0 || ev_us > SBE_MAX_US || u < 0 || !sbe_divisors(blk + 16, ev) ||
            !sbe_mantissa_ok(bid) || !sbe_mantissa_ok(bid_q) || !sbe_mantissa_ok(ask) ||
            !sbe_mantissa_ok(ask_q))
            return 0;
        Tick *g = &ev->bba;
        memset(g, 0, sizeof(*g));
        g->kind = KIND_BOOK_TICKER;
        g->id = u;
        g->bid = (double)bid / ev->pdiv;
        g->bid_qty = (double)bid_q / ev->qdiv;
        g->ask = (double)ask / ev->pdiv;
        g->ask_qty = (double)ask_q / ev->qdiv;
        g->event_ns = ev_us * 1000; /* SBE has the event time JSON bookTicker lacks */
        ev->kind = KIND_BOOK_TICKER;
        ev->sid = sid;
        ev->first_id = ev->last_id = u;
        ev->event_ns = g->event_ns;
        ev->count = 1;
        return 1;
    }
    return 0;
}

static inline void put_i64(char *rec, int off, int64_t v) { memcpy(rec + off, &v, 8); }
static inline void put_f64(char *rec, int off, double v) { memcpy(rec + off, &v, 8); }

static inline void write_record(char *rec, const Tick *g, int sid, int64_t recv_ns) {
    uint16_t sym = (uint16_t)sid, z16 = 0;
    rec[OFF_KIND] = (char)g->kind;
    rec[OFF_FLAGS] = g->maker ? FLAG_BUYER_IS_MAKER : 0;
    memcpy(rec + OFF_SYMBOL, &sym, 2);
    memcpy(rec + OFF_LEVEL, &z16, 2);
    memcpy(rec + OFF_PAD, &z16, 2);
    put_f64(rec, OFF_PRICE, g->price);
    put_f64(rec, OFF_QTY, g->qty);
    put_f64(rec, OFF_BID_PRICE, g->bid);
    put_f64(rec, OFF_BID_QTY, g->bid_qty);
    put_f64(rec, OFF_ASK_PRICE, g->ask);
    put_f64(rec, OFF_ASK_QTY, g->ask_qty);
    put_i64(rec, OFF_TRADE_ID, g->id);
    put_i64(rec, OFF_AUX_ID, g->aux);
    put_i64(rec, OFF_EVENT_TIME, g->event_ns);
    put_i64(rec, OFF_RECV_TIME, recv_ns);
    put_i64(rec, OFF_PUBLISH_TIME, 0);
}

static void release_buffers(TickFastPath *self) {
    if (self->have_bufs) {
        PyBuffer_Release(&self->data);
        PyBuffer_Release(&self->seqs);
        PyBuffer_Release(&self->hdr);
        self->have_bufs = 0;
    }
}

static int TickFastPath_traverse(TickFastPath *self, visitproc visit, void *arg) {
    Py_VISIT(self->fallback);
    Py_VISIT(self->sbe_fallback);
    Py_VISIT(self->iter_conn);
    return 0;
}

static int TickFastPath_clear(TickFastPath *self) {
    release_buffers(self);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->sbe_fallback);
    Py_CLEAR(self->iter_conn);
    return 0;
}

static void free_table(Route *table, Py_ssize_t mask) {
    if (table) {
        for (Py_ssize_t i = 0; i <= mask; i++)
            PyMem_Free(table[i].name);
        PyMem_Free(table);
    }
}

/* A table of 2 * n_entries + 1 slots or more (a power of two), all empty; NULL: no memory. */
static Route *new_table(Py_ssize_t n_entries, Py_ssize_t *mask) {
    Py_ssize_t size = 8;
    while (size < 2 * n_entries + 1)
        size *= 2;
    *mask = size - 1;
    return PyMem_Calloc((size_t)size, sizeof(Route));
}

/* Add a name (copied) to an open-addressing table with room for it; -1: no memory. */
static int table_insert(Route *table, Py_ssize_t mask, const char *s, Py_ssize_t n, int sid,
                        int kind) {
    uint64_t h = fnv1a(s, n);
    Py_ssize_t i = (Py_ssize_t)(h & (uint64_t)mask);
    while (table[i].name != NULL)
        i = (i + 1) & mask;
    table[i].name = PyMem_Malloc((size_t)n + 1);
    if (!table[i].name) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(table[i].name, s, (size_t)n);
    table[i].hash = h;
    table[i].len = n;
    table[i].sid = sid;
    table[i].kind = kind;
    return 0;
}

static void TickFastPath_dealloc(TickFastPath *self) {
    PyObject_GC_UnTrack(self);
    TickFastPath_clear(self);
    free_table(self->routes, self->route_mask);
    free_table(self->sbe_syms, self->sbe_mask);
    PyMem_Free(self->last);
    PyMem_Free(self->armed);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A writable, C-contiguous view of `obj` (a memoryview of the ring), 8-byte aligned if `words`. */
static int get_ring_buffer(PyObject *obj, const char *what, int words, Py_buffer *view) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (words && ((uintptr_t)view->buf % 8 || view->len % 8)) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "%s must be int64 words (8-byte aligned)", what);
        return -1;
    }
    return 0;
}

static int TickFastPath_init(TickFastPath *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"routes", "n_symbols", "fallback", "data", "seqs", "header",
                             "capacity", "record_size", "max_staged", "stamp_offset",
                             "cursor_word", "intent_word", "sleepers_word", "max_frame_bytes",
                             "time_mult", "max_id_jump", "sbe_symbols", "sbe_fallback", NULL};
    PyObject *routes, *fallback = Py_None, *data = Py_None, *seqs = Py_None, *header = Py_None;
    PyObject *sbe_symbols = Py_None, *sbe_fallback = Py_None;
    Py_ssize_t n_symbols, max_frame = PY_SSIZE_T_MAX;
    long long capacity = 0, rs = 0, max_staged = 0, stamp_off = -1, cursor_word = -1,
              intent_word = -1, sleepers_word = -1, time_mult = 1000000,
              max_id_jump = INT64_MAX;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!n|$OOOOLLLLLLLnLLOO", kwlist,
                                     &PyDict_Type, &routes, &n_symbols, &fallback, &data, &seqs,
                                     &header, &capacity, &rs, &max_staged, &stamp_off,
                                     &cursor_word, &intent_word, &sleepers_word, &max_frame,
                                     &time_mult, &max_id_jump, &sbe_symbols, &sbe_fallback))
        return -1;
    if (sbe_symbols != Py_None && !PyDict_Check(sbe_symbols)) {
        PyErr_SetString(PyExc_TypeError, "sbe_symbols must be a dict {b'BTCUSDT': symbol_id}");
        return -1;
    }
    if (sbe_fallback != Py_None && !PyCallable_Check(sbe_fallback)) {
        PyErr_SetString(PyExc_TypeError, "sbe_fallback must be callable");
        return -1;
    }
    if (max_id_jump < 1) {
        PyErr_SetString(PyExc_ValueError, "max_id_jump must be >= 1");
        return -1;
    }
    if (self->routes != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "TickFastPath is initialised once");
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
    self->max_id_jump = max_id_jump;
    self->last = PyMem_Calloc((size_t)(N_KINDS * n_symbols), sizeof(int64_t));
    self->armed = PyMem_Calloc((size_t)(N_KINDS * n_symbols), 1);
    self->routes = new_table(PyDict_GET_SIZE(routes), &self->route_mask);
    if (!self->last || !self->armed || !self->routes) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(routes, &pos, &key, &value)) {
        int sid, kind;
        if (!PyBytes_Check(key)) {
            PyErr_SetString(PyExc_TypeError, "routes keys must be bytes (stream names)");
            return -1;
        }
        if (!PyArg_ParseTuple(value, "ii;routes values must be (symbol_id, kind)", &sid, &kind))
            return -1;
        if (sid < 0 || sid >= n_symbols || kind < 1 || kind > N_KINDS) {
            PyErr_SetString(PyExc_ValueError, "route symbol id or kind out of range");
            return -1;
        }
        if (table_insert(self->routes, self->route_mask, PyBytes_AS_STRING(key),
                         PyBytes_GET_SIZE(key), sid, kind) < 0)
            return -1;
    }
    if (sbe_symbols != Py_None) { /* a dict: one entry per wire symbol, as the decoder's */
        self->sbe_syms = new_table(PyDict_GET_SIZE(sbe_symbols), &self->sbe_mask);
        if (!self->sbe_syms) {
            PyErr_NoMemory();
            return -1;
        }
        pos = 0;
        while (PyDict_Next(sbe_symbols, &pos, &key, &value)) {
            if (!PyBytes_Check(key)) {
                PyErr_SetString(PyExc_TypeError, "sbe_symbols keys must be bytes");
                return -1;
            }
            if (PyBytes_GET_SIZE(key) > 255)
                continue; /* no u8-length wire symbol can name it: its frames never come */
            long sid = PyLong_AsLong(value);
            if (sid == -1 && PyErr_Occurred())
                return -1;
            if (sid < 0 || sid >= n_symbols) {
                PyErr_SetString(PyExc_ValueError, "sbe_symbols symbol id out of range");
                return -1;
            }
            if (table_insert(self->sbe_syms, self->sbe_mask, PyBytes_AS_STRING(key),
                             PyBytes_GET_SIZE(key), (int)sid, 0) < 0)
                return -1;
        }
    }
    if (data != Py_None) { /* a ring to stage into: FastPathView's fields, checked */
        if (capacity < 2 || (capacity & (capacity - 1)) || rs < RECORD_BYTES ||
            max_staged < 1 || max_staged > capacity || cursor_word < 0 || intent_word < 0 ||
            sleepers_word < 0 || cursor_word == intent_word || sleepers_word == cursor_word ||
            sleepers_word == intent_word) {
            PyErr_SetString(PyExc_ValueError, "ring geometry unusable for the fast path");
            return -1;
        }
        if (stamp_off != OFF_PUBLISH_TIME) {
            PyErr_SetString(PyExc_ValueError, "the ring writer must stage with "
                                              "publish_time_ns as the stamp field");
            return -1;
        }
        if (!PyCallable_Check(fallback)) {
            PyErr_SetString(PyExc_TypeError, "a ring needs a callable fallback");
            return -1;
        }
        if (get_ring_buffer(data, "data", 0, &self->data) < 0)
            return -1;
        if (get_ring_buffer(seqs, "seqs", 1, &self->seqs) < 0) {
            PyBuffer_Release(&self->data);
            return -1;
        }
        if (get_ring_buffer(header, "header", 1, &self->hdr) < 0) {
            PyBuffer_Release(&self->data);
            PyBuffer_Release(&self->seqs);
            return -1;
        }
        self->have_bufs = 1;
        long long top = cursor_word > intent_word ? cursor_word : intent_word;
        top = top > sleepers_word ? top : sleepers_word;
        if (self->data.len < capacity * rs || self->seqs.len < capacity * 8 ||
            self->hdr.len < (top + 1) * 8) {
            release_buffers(self);
            PyErr_SetString(PyExc_ValueError, "ring buffers smaller than its geometry");
            return -1;
        }
        self->mask = capacity - 1;
        self->record_size = rs;
        self->max_staged = max_staged;
        self->cursor_word = cursor_word;
        self->intent_word = intent_word;
        self->sleepers_word = sleepers_word;
    }
    Py_INCREF(fallback);
    Py_XSETREF(self->fallback, fallback);
    Py_INCREF(sbe_fallback);
    Py_XSETREF(self->sbe_fallback, sbe_fallback);
    return 0;
}

/* Publish the record in the ring's next slot, as WriterCore.publish does: the next sequence is
 * the header's intent (= cursor + staged). Records the Python writer staged and has not
 * committed yet (none, unless its shell is between stage() and commit()) are published with it,
 * stamped with the same time, exactly as WriterCore.commit would. Returns 0, or -2 (nothing
 * written) if the header makes no sense or a full batch waits: Python decides. */
static inline int publish(TickFastPath *self, const Tick *g, int sid, int64_t recv_ns) {
    int64_t *hdr = (int64_t *)self->hdr.buf, *seqs = (int64_t *)self->seqs.buf;
    /* this process is the ring's only writer: its own earlier stores, read back */
    int64_t s = __atomic_load_n(&hdr[self->intent_word], __ATOMIC_RELAXED);
    int64_t c = __atomic_load_n(&hdr[self->cursor_word], __ATOMIC_RELAXED);
    if (s - c < 0 || s - c >= self->max_staged)
        return -2;
    int64_t i = s & self->mask;
    /* intent before the slot is touched, the slot before its sequence stamp, the stamp before
     * the cursor: a lagging reader must never take a half-written slot for a good one (the
     * release fences keep the stores in this order for the compiler, and for the CPU where it
     * could reorder stores) */
    __atomic_store_n(&hdr[self->intent_word], s + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now); /* time.time_ns(): the publish time readers compare */
    int64_t now_ns = (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
    char *rec = (char *)self->data.buf + i * self->record_size;
    write_record(rec, g, sid, recv_ns);
    put_i64(rec, OFF_PUBLISH_TIME, now_ns);
    for (int64_t k = c; k < s; k++) /* staged by Python, published by this cursor store */
        put_i64((char *)self->data.buf + (k & self->mask) * self->record_size, OFF_PUBLISH_TIME,
                now_ns);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&seqs[i], s, __ATOMIC_RELAXED);
    /* sequentially consistent: the cursor store is ordered before the sleepers load (a reader
     * sets its bit, then re-reads the cursor: one of the two sees the other) */
    __atomic_store_n(&hdr[self->cursor_word], s + 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&hdr[self->sleepers_word], __ATOMIC_SEQ_CST)) {
        syscall(SYS_futex, &hdr[self->cursor_word], FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
        self->wakes++;
    }
    return 0;
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

static PyObject *call_handler(PyObject *handler, PyObject *conn, PyObject *payload,
                              PyObject *recv, long code) {
    PyObject *c = PyLong_FromLong(code);
    if (!c)
        return NULL;
    PyObject *args[4] = {conn, payload, recv, c};
    PyObject *r = PyObject_Vectorcall(handler, args, 4, NULL);
    Py_DECREF(c);
    return r;
}

static inline PyObject *call_fallback(TickFastPath *self, PyObject *conn, PyObject *payload,
                                      PyObject *recv, long code) {
    return call_handler(self->fallback, conn, payload, recv, code);
}

/* After this path published a frame of `conn`: tell `handler` (code 2) unless it already
 * heard of this connection in this loop iteration (on_message's rule, for both entries). */
static inline PyObject *told_once_per_iteration(TickFastPath *self, PyObject *handler,
                                                PyObject *conn, PyObject *payload,
                                                PyObject *recv) {
    if (self->iter_open && conn == self->iter_conn)
        Py_RETURN_NONE; /* the common case: nothing for Python to do */
    PyObject *r = call_handler(handler, conn, payload, recv, 2);
    if (r != NULL && self->iter_open) { /* (the fallback may have opened the iteration) */
        Py_INCREF(conn);
        Py_XSETREF(self->iter_conn, conn);
    }
    return r;
}

PyDoc_STRVAR(on_message_doc,
"on_message(conn, payload, recv_time_ns) -> None\n\n"
"The frame callback; conn is an opaque token, only handed back to the fallback. The common\n"
"case (one of our streams, the id the armed symbol expects next) is published into the ring\n"
"here, and fallback(conn, payload, recv_time_ns, 2) is called after it if Python must learn\n"
"of it: the loop iteration is not open (iter_open 0), or this is the first frame of this\n"
"connection in this iteration (so per-connection state such as the last frame time stays\n"
"Python's, at most one loop iteration old). Any other frame: fallback(conn, payload,\n"
"recv_time_ns, 0), nothing written, no state changed.");

static PyObject *TickFastPath_on_message(TickFastPath *self, PyObject *const *args,
                                        Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "on_message(conn, payload, recv_time_ns)");
        return NULL;
    }
    if (!self->have_bufs) {
        PyErr_SetString(PyExc_RuntimeError, "TickFastPath has no ring writer (closed?)");
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
    Tick g;
    int sid = -1;
    int ok = n <= self->max_frame_bytes && parse_frame(self, buf, n, &g, &sid);
    if (view.obj)
        PyBuffer_Release(&view);
    Py_ssize_t slot = ok ? (g.kind - 1) * self->n_symbols + sid : 0;
    /* both ids are in 0..INT64_MAX (json_uint, set_last): the difference cannot overflow */
    if (!ok || !self->armed[slot] ||
        (g.kind == KIND_BOOK_TICKER ? g.id <= self->last[slot] ||
                                          g.id - self->last[slot] > self->max_id_jump
                                    : g.id != self->last[slot] + 1))
        return call_fallback(self, conn, payload, recv, 0);
    int64_t recv_ns = PyLong_AsLongLong(recv);
    if (recv_ns == -1 && PyErr_Occurred())
        return NULL;
    if (publish(self, &g, sid, recv_ns) == -2)
        return call_fallback(self, conn, payload, recv, 0);
    self->last[slot] = g.id;
    self->frames++;
    return told_once_per_iteration(self, self->fallback, conn, payload, recv);
}

PyDoc_STRVAR(on_sbe_message_doc,
"on_sbe_message(conn, payload, recv_time_ns) -> None\n\n"
"The frame callback of an SBE connection, as on_message is for JSON ones, with\n"
"sbe_fallback(conn, payload, recv_time_ns, code) in place of fallback. It takes a trades\n"
"event (template 10000) whose group starts at the next @trade id of the armed symbol and is\n"
"contiguous (one TRADE record per trade, in order: all of them or none) and a bestBidAsk\n"
"(10001) with a newer u within max_id_jump (one BOOK_TICKER record with its event time), at\n"
"schema 1 version 0's fixed offsets; the id state is the one on_message shares with Python\n"
"(kinds 2 and 3). Any other frame: sbe_fallback(..., 0), nothing written, no state changed.");

static PyObject *TickFastPath_on_sbe_message(TickFastPath *self, PyObject *const *args,
                                            Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "on_sbe_message(conn, payload, recv_time_ns)");
        return NULL;
    }
    if (!self->have_bufs) {
        PyErr_SetString(PyExc_RuntimeError, "TickFastPath has no ring writer (closed?)");
        return NULL;
    }
    if (self->sbe_fallback == NULL || self->sbe_fallback == Py_None) {
        PyErr_SetString(PyExc_RuntimeError, "TickFastPath was built without an sbe_fallback");
        return NULL;
    }
    PyObject *conn = args[0], *payload = args[1], *recv = args[2], *r = NULL;
    Py_buffer view;
    const char *buf;
    Py_ssize_t n;
    if (get_payload(payload, &view, &buf, &n) < 0) { /* a text frame (str): Python's */
        PyErr_Clear();
        return call_handler(self->sbe_fallback, conn, payload, recv, 0);
    }
    SbeEvent ev;
    int ok = n <= self->max_frame_bytes && parse_sbe(self, buf, n, &ev);
    Py_ssize_t slot = ok ? (ev.kind - 1) * self->n_symbols + ev.sid : 0;
    /* ids are in 0..INT64_MAX (parse_sbe, set_last): the differences cannot overflow */
    if (!ok || !self->armed[slot] ||
        (ev.kind == KIND_BOOK_TICKER ? ev.first_id <= self->last[slot] ||
                                           ev.first_id - self->last[slot] > self->max_id_jump
                                     : ev.first_id - 1 != self->last[slot])) {
        if (view.obj)
            PyBuffer_Release(&view);
        return call_handler(self->sbe_fallback, conn, payload, recv, 0);
    }
    int64_t recv_ns = PyLong_AsLongLong(recv);
    if (recv_ns == -1 && PyErr_Occurred())
        goto done;
    if (ev.kind == KIND_BOOK_TICKER) {
        if (publish(self, &ev.bba, ev.sid, recv_ns) == -2) {
            r = call_handler(self->sbe_fallback, conn, payload, recv, 0);
            goto done;
        }
    } else {
        /* only the first publish can find a full batch of Python-staged records waiting: it
         * publishes them, so the others start from an empty batch (this process is the
         * ring's only writer and holds the GIL). Were it otherwise, the ids published so far
         * are recorded and the frame goes to Python, whose tracker drops them as duplicates
         * and publishes the rest: nothing twice, nothing lost. */
        for (Py_ssize_t i = 0; i < ev.count; i++) {
            Tick g;
            sbe_trade_tick(&ev, i, &g);
            if (publish(self, &g, ev.sid, recv_ns) == -2) {
                if (i > 0)
                    self->last[slot] = g.id - 1;
                r = call_handler(self->sbe_fallback, conn, payload, recv, 0);
                goto done;
            }
        }
    }
    self->last[slot] = ev.last_id;
    self->frames++;
    r = told_once_per_iteration(self, self->sbe_fallback, conn, payload, recv);
done:
    if (view.obj)
        PyBuffer_Release(&view);
    return r;
}

PyDoc_STRVAR(parse_doc,
"parse(payload, recv_time_ns=0) -> (kind, symbol_id, id, record: bytes) | None\n\n"
"What on_message would write for this frame (publish_time_ns 0), ignoring the id state;\n"
"None if this path declines it. For tests and benchmarks.");

PyDoc_STRVAR(parse_sbe_doc,
"parse_sbe(payload, recv_time_ns=0) -> (kind, symbol_id, first_id, records: bytes) | None\n\n"
"What on_sbe_message would write for this SBE frame (records: one per trade, or the one\n"
"best bid/ask, publish_time_ns 0), ignoring the id state; None if this path declines it.\n"
"For tests and benchmarks.");

static PyObject *TickFastPath_parse_sbe(TickFastPath *self, PyObject *args) {
    Py_buffer view;
    long long recv_ns = 0;
    if (!PyArg_ParseTuple(args, "y*|L", &view, &recv_ns))
        return NULL;
    SbeEvent ev;
    PyObject *out = NULL;
    if (!(view.len <= self->max_frame_bytes && parse_sbe(self, view.buf, view.len, &ev))) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    PyObject *recs = PyBytes_FromStringAndSize(NULL, ev.count * RECORD_BYTES);
    if (recs) {
        char *dst = PyBytes_AS_STRING(recs);
        if (ev.kind == KIND_BOOK_TICKER) {
            write_record(dst, &ev.bba, ev.sid, recv_ns);
        } else {
            for (Py_ssize_t i = 0; i < ev.count; i++) {
                Tick g;
                sbe_trade_tick(&ev, i, &g);
                write_record(dst + i * RECORD_BYTES, &g, ev.sid, recv_ns);
            }
        }
        out = Py_BuildValue("iiLN", ev.kind, ev.sid, (long long)ev.first_id, recs);
    }
    PyBuffer_Release(&view);
    return out;
}

static PyObject *TickFastPath_parse(TickFastPath *self, PyObject *args) {
    Py_buffer view;
    long long recv_ns = 0;
    if (!PyArg_ParseTuple(args, "y*|L", &view, &recv_ns))
        return NULL;
    Tick g;
    int sid = -1;
    int ok = view.len <= self->max_frame_bytes &&
             parse_frame(self, view.buf, view.len, &g, &sid);
    PyBuffer_Release(&view);
    if (!ok)
        Py_RETURN_NONE;
    PyObject *rec = PyBytes_FromStringAndSize(NULL, RECORD_BYTES);
    if (!rec)
        return NULL;
    write_record(PyBytes_AS_STRING(rec), &g, sid, recv_ns);
    return Py_BuildValue("iiLN", g.kind, sid, (long long)g.id, rec);
}

/* The state slot named by `nargs` positional arguments: symbol_id first, kind (default
 * aggTrade) at `kind_at` if given; -1 with an exception for a wrong count or range. */
static Py_ssize_t state_slot(TickFastPath *self, PyObject *const *args, Py_ssize_t nargs,
                             Py_ssize_t kind_at, const char *usage) {
    if (nargs < kind_at || nargs > kind_at + 1) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    PyObject *sid_obj = args[0], *kind_obj = nargs > kind_at ? args[kind_at] : NULL;
    Py_ssize_t sid = PyLong_AsSsize_t(sid_obj);
    if (sid == -1 && PyErr_Occurred())
        return -1;
    long kind = kind_obj ? PyLong_AsLong(kind_obj) : KIND_AGG_TRADE;
    if (kind == -1 && PyErr_Occurred())
        return -1;
    if (sid < 0 || sid >= self->n_symbols || kind < 1 || kind > N_KINDS) {
        PyErr_SetString(PyExc_IndexError, "symbol id or kind out of range");
        return -1;
    }
    return (kind - 1) * self->n_symbols + sid;
}

PyDoc_STRVAR(last_id_doc,
"last_id(symbol_id, kind=1) -> int | None\n\n"
"The last id this path published for the symbol's stream of that kind (1 aggTrade `a`,\n"
"2 trade `t`, 3 bookTicker `u`; Kind values), None while it is disarmed.");

static PyObject *TickFastPath_last_id(TickFastPath *self, PyObject *const *args,
                                     Py_ssize_t nargs) {
    Py_ssize_t slot = state_slot(self, args, nargs, 1, "last_id(symbol_id, kind=1)");
    if (slot < 0)
        return NULL;
    if (!self->armed[slot])
        Py_RETURN_NONE;
    return PyLong_FromLongLong(self->last[slot]);
}

PyDoc_STRVAR(set_last_doc,
"set_last(symbol_id, last: int | None, kind=1) -> None\n\n"
"Arm the symbol's stream of that kind (this path publishes id last + 1 next; for bookTicker\n"
"any u > last), or disarm it with None (everything of it goes to the fallback: a gap is\n"
"open, or nothing was seen yet).");

static PyObject *TickFastPath_set_last(TickFastPath *self, PyObject *const *args,
                                      Py_ssize_t nargs) {
    Py_ssize_t slot = state_slot(self, args, nargs, 2, "set_last(symbol_id, last, kind=1)");
    if (slot < 0)
        return NULL;
    if (args[1] == Py_None) {
        self->armed[slot] = 0;
        Py_RETURN_NONE;
    }
    long long last = PyLong_AsLongLong(args[1]);
    if (last == -1 && PyErr_Occurred())
        return NULL;
    self->last[slot] = last;
    /* last + 1 must not overflow; ids are never negative (a negative one stays disarmed) */
    self->armed[slot] = last >= 0 && last < INT64_MAX;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(close_doc,
"close() -> None\n\n"
"Release the ring buffers (the ring's shared memory cannot be closed while they are held).");

static PyObject *TickFastPath_close(TickFastPath *self, PyObject *Py_UNUSED(ignored)) {
    release_buffers(self);
    Py_RETURN_NONE;
}

static PyMethodDef TickFastPath_methods[] = {
    {"on_message", (PyCFunction)(void (*)(void))TickFastPath_on_message, METH_FASTCALL,
     on_message_doc},
    {"on_sbe_message", (PyCFunction)(void (*)(void))TickFastPath_on_sbe_message, METH_FASTCALL,
     on_sbe_message_doc},
    {"parse", (PyCFunction)TickFastPath_parse, METH_VARARGS, parse_doc},
    {"parse_sbe", (PyCFunction)TickFastPath_parse_sbe, METH_VARARGS, parse_sbe_doc},
    {"last_id", (PyCFunction)(void (*)(void))TickFastPath_last_id, METH_FASTCALL, last_id_doc},
    {"set_last", (PyCFunction)(void (*)(void))TickFastPath_set_last, METH_FASTCALL,
     set_last_doc},
    {"close", (PyCFunction)TickFastPath_close, METH_NOARGS, close_doc},
    {NULL, NULL, 0, NULL},
};

static PyObject *TickFastPath_get_iter_open(TickFastPath *self, void *Py_UNUSED(closure)) {
    return PyLong_FromLong(self->iter_open);
}

static int TickFastPath_set_iter_open(TickFastPath *self, PyObject *value,
                                      void *Py_UNUSED(closure)) {
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "iter_open cannot be deleted");
        return -1;
    }
    int v = PyObject_IsTrue(value);
    if (v < 0)
        return -1;
    self->iter_open = v;
    Py_CLEAR(self->iter_conn); /* a new iteration (or none): every connection is told again */
    return 0;
}

static PyGetSetDef TickFastPath_getset[] = {
    {"iter_open", (getter)TickFastPath_get_iter_open, (setter)TickFastPath_set_iter_open,
     "1 while an event-loop iteration has published (stage the rest; the shell commits); "
     "setting it starts a new round of per-connection fallback calls", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef TickFastPath_members[] = {
    {"frames", T_LONGLONG, offsetof(TickFastPath, frames), READONLY,
     "frames fully handled here (the shell adds them to frames_received)"},
    {"max_staged", T_LONGLONG, offsetof(TickFastPath, max_staged), READONLY,
     "the ring's max_staged when this was built"},
    {"wakes", T_LONGLONG, offsetof(TickFastPath, wakes), READONLY,
     "futex wake calls made (publishes that found a reader asleep)"},
    {NULL, 0, 0, 0, NULL},
};

PyDoc_STRVAR(TickFastPath_doc,
"TickFastPath(routes, n_symbols, *, fallback=None, data=None, seqs=None, header=None,\n"
"            capacity=0, record_size=0, max_staged=0, stamp_offset=-1, cursor_word=-1,\n"
"            intent_word=-1, sleepers_word=-1, max_frame_bytes=sys.maxsize, time_mult=1000000,\n"
"            max_id_jump=2**63-1, sbe_symbols=None, sbe_fallback=None)\n\n"
"routes: {b'btcusdt@aggTrade': (symbol_id, kind), ...}; data .. intent_word: the fields of\n"
"pipeline.ipc.ring.FastPathView (a ring writer's buffers and geometry; without data: parse\n"
"only); fallback(conn, payload, recv_time_ns, code): the Python handler; time_mult: ns per\n"
"unit of E (1000000 for ms, 1000 with timeUnit=MICROSECOND); max_id_jump: a bookTicker u\n"
"further above the last one goes to the fallback; sbe_symbols: {b'BTCUSDT': symbol_id, ...}\n"
"(the SBE wire symbols; without them on_sbe_message takes nothing); sbe_fallback: the Python\n"
"handler of SBE frames (on_sbe_message's fallback).");

static PyTypeObject TickFastPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pipeline.marketdata._ticks.TickFastPath",
    .tp_basicsize = sizeof(TickFastPath),
    .tp_dealloc = (destructor)TickFastPath_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)TickFastPath_traverse,
    .tp_clear = (inquiry)TickFastPath_clear,
    .tp_doc = TickFastPath_doc,
    .tp_methods = TickFastPath_methods,
    .tp_members = TickFastPath_members,
    .tp_getset = TickFastPath_getset,
    .tp_init = (initproc)TickFastPath_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef ticks_module = {
    PyModuleDef_HEAD_INIT, "pipeline.marketdata._ticks",
    "Compiled frame -> ring slot fast path for aggTrade, trade and bookTicker (JSON) and "
    "trade and bestBidAsk (SBE) (see pipeline/marketdata/fastpath.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__ticks(void) {
    if (PyType_Ready(&TickFastPathType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&ticks_module);
    if (!m)
        return NULL;
    Py_INCREF(&TickFastPathType);
    if (PyModule_AddObject(m, "TickFastPath", (PyObject *)&TickFastPathType) < 0) {
        Py_DECREF(&TickFastPathType);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *layout = Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "kind", OFF_KIND,
        "flags", OFF_FLAGS, "symbol", OFF_SYMBOL, "level", OFF_LEVEL, "_pad", OFF_PAD, "price",
        OFF_PRICE, "qty", OFF_QTY, "bid_price", OFF_BID_PRICE, "bid_qty", OFF_BID_QTY,
        "ask_price", OFF_ASK_PRICE, "ask_qty", OFF_ASK_QTY, "trade_id", OFF_TRADE_ID, "aux_id",
        OFF_AUX_ID, "event_time_ns", OFF_EVENT_TIME, "recv_time_ns", OFF_RECV_TIME,
        "publish_time_ns", OFF_PUBLISH_TIME);
    if (!layout || PyModule_AddObject(m, "LAYOUT", layout) < 0) {
        Py_XDECREF(layout);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "RECORD_BYTES", RECORD_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "API_VERSION", API_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "KIND_AGG_TRADE", KIND_AGG_TRADE) < 0 ||
        PyModule_AddIntConstant(m, "KIND_TRADE", KIND_TRADE) < 0 ||
        PyModule_AddIntConstant(m, "KIND_BOOK_TICKER", KIND_BOOK_TICKER) < 0 ||
        PyModule_AddIntConstant(m, "FLAG_BUYER_IS_MAKER", FLAG_BUYER_IS_MAKER) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
