/* heartbeatd/wire/_lift.h: long plain strings lifted out of a JSON body before it is parsed.
 *
 * Part of _speedups.c (included once, into its one translation unit).
 *
 * Why: the JSON parser (orjson) reads a string's text a byte at a time; a 256 KiB echo spent
 * half the daemon's time there (docs/benchmarks.md).  A run of at least LIFT_MIN_RUN bytes,
 * each printable ASCII other than '"' and '\\', with a '"' on each side, is most often the
 * whole text of one string, whose value is those very bytes.  Such runs are cut out: the
 * parser gets the body with each run replaced by a token (a per-process random nonce and the
 * run's number), and each token found in the parsed value is replaced by a str of its run,
 * copied with a vector loop.  The parser still parses every body; nothing else is parsed here.
 *
 * Why the value is the one the whole body parses to.  The nonce cannot be guessed, so a string
 * in the parsed value equal to token i can only be the string token `"token_i"` at run i's
 * place: the '"' before the run opens a string in the shortened body.  Both bodies are the
 * same bytes up to there (every earlier run found so too is one whole string in both), so that
 * '"' opens a string in the whole body as well, and the run, holding no quote and no
 * backslash, is all of that string's text.  Every run must be found so, exactly once, as a
 * value (a dict key is never looked for: duplicate keys must collapse as the parser collapses
 * them).  Otherwise, or if the shortened body does not parse, the whole body is parsed, and
 * its value or its error is the answer: a run that was not a string's text (long whitespace
 * between two strings, say) costs one parse more, never a different answer.
 * tests/test_lift.py compares the two with hypothesis, hostile bodies included.
 */

/* Bodies shorter than this are parsed whole: the scan would cost more than it saves. */
#define LIFT_MIN_BODY 16384
/* Runs shorter than this stay in the body. */
#define LIFT_MIN_RUN 4096
/* A token: the nonce's hex, then the run's number in 8 hex digits. */
#define LIFT_NONCE_LEN 32
#define LIFT_TOKEN_LEN (LIFT_NONCE_LEN + 8)
/* The value is walked this deep at most (the parser stops at 1024); deeper: parsed whole. */
#define LIFT_MAX_DEPTH 1100
/* Room for the runs of a body up to 1 MiB, on the stack. */
#define LIFT_LOCAL_RUNS 257

static char lift_nonce[LIFT_NONCE_LEN]; /* set at import, from os.urandom */
/* Bodies whose runs were lifted, and bodies parsed whole after a lift was tried (tests). */
static unsigned long long lift_lifted = 0, lift_refused = 0;

typedef struct {
    Py_ssize_t start, end; /* the run is body[start:end] */
} LiftRun;

typedef struct {
    const char *body;
    const LiftRun *runs;
    Py_ssize_t count, found;
    unsigned char *seen; /* seen[i]: run i's token was found */
} Lift;

/* A run ending at `end` (a special byte) that began at `start`: kept if long enough and
 * quoted on both sides. */
#define LIFT_CONSIDER(start, end)                                                            \
    do {                                                                                     \
        if ((end) - (start) >= LIFT_MIN_RUN && (start) > 0 && c[(start)-1] == '"' &&         \
            c[(end)] == '"')                                                                 \
            runs[count++] = (LiftRun){(start), (end)};                                       \
    } while (0)

/* The scan of whole 64-byte blocks, given MASK64(p): a bit for each byte of p[0:64] that is
 * not plain.  A run goes on through blocks with no such byte; a block with one ends the run
 * at its first special byte and starts the next after its last. */
#define LIFT_SCAN_BLOCKS(MASK64)                                                             \
    for (; i + 64 <= n; i += 64) {                                                           \
        uint64_t m = MASK64(c + i);                                                          \
        if (m == 0)                                                                          \
            continue;                                                                        \
        Py_ssize_t first = i + __builtin_ctzll(m);                                           \
        LIFT_CONSIDER(start, first);                                                         \
        start = i + 64 - __builtin_clzll(m);                                                 \
    }

#if defined(__GNUC__) || defined(__clang__)
#define LIFT_HAVE_BUILTINS 1
#endif

#if defined(__SSE2__) && defined(LIFT_HAVE_BUILTINS)
/* Bytes that are not plain: below 0x20 or 0x80 and above (negative as signed), '"', '\\', 0x7f. */
static inline uint64_t
lift_mask_sse2(const unsigned char *p)
{
    const __m128i space = _mm_set1_epi8(0x20), quote = _mm_set1_epi8('"'),
                  backslash = _mm_set1_epi8('\\'), del = _mm_set1_epi8(0x7f);
    uint64_t m = 0;
    for (int k = 0; k < 4; k++) {
        __m128i v = _mm_loadu_si128((const __m128i *)(p + 16 * k));
        __m128i bad = _mm_or_si128(_mm_or_si128(_mm_cmplt_epi8(v, space), _mm_cmpeq_epi8(v, quote)),
                                   _mm_or_si128(_mm_cmpeq_epi8(v, backslash), _mm_cmpeq_epi8(v, del)));
        m |= (uint64_t)(uint16_t)_mm_movemask_epi8(bad) << (16 * k);
    }
    return m;
}
#endif

#ifdef HAVE_AVX2_COPY
__attribute__((target("avx2"))) static inline uint64_t
lift_mask_avx2(const unsigned char *p)
{
    const __m256i space = _mm256_set1_epi8(0x20), quote = _mm256_set1_epi8('"'),
                  backslash = _mm256_set1_epi8('\\'), del = _mm256_set1_epi8(0x7f);
    __m256i a = _mm256_loadu_si256((const __m256i *)p),
            b = _mm256_loadu_si256((const __m256i *)(p + 32));
    __m256i bad_a = _mm256_or_si256(
        _mm256_or_si256(_mm256_cmpgt_epi8(space, a), _mm256_cmpeq_epi8(a, quote)),
        _mm256_or_si256(_mm256_cmpeq_epi8(a, backslash), _mm256_cmpeq_epi8(a, del)));
    __m256i bad_b = _mm256_or_si256(
        _mm256_or_si256(_mm256_cmpgt_epi8(space, b), _mm256_cmpeq_epi8(b, quote)),
        _mm256_or_si256(_mm256_cmpeq_epi8(b, backslash), _mm256_cmpeq_epi8(b, del)));
    return (uint64_t)(uint32_t)_mm256_movemask_epi8(bad_a) |
           (uint64_t)(uint32_t)_mm256_movemask_epi8(bad_b) << 32;
}

/* The block scan with AVX2: returns where it stopped, updating *start and *count. */
__attribute__((target("avx2"))) static Py_ssize_t
lift_scan_avx2(const unsigned char *c, Py_ssize_t n, LiftRun *runs, Py_ssize_t *count_,
               Py_ssize_t *start_)
{
    Py_ssize_t i = 0, start = *start_, count = *count_;
    LIFT_SCAN_BLOCKS(lift_mask_avx2)
    *start_ = start;
    *count_ = count;
    return i;
}
#endif

/* The runs of `c[:n]` worth lifting, into `runs` (room for n / LIFT_MIN_RUN + 1): how many. */
static Py_ssize_t
lift_find_runs(const unsigned char *c, Py_ssize_t n, LiftRun *runs)
{
    Py_ssize_t i = 0, start = 0, count = 0;
#ifdef HAVE_AVX2_COPY
    if (have_avx2)
        i = lift_scan_avx2(c, n, runs, &count, &start);
#endif
#if defined(__SSE2__) && defined(LIFT_HAVE_BUILTINS)
    LIFT_SCAN_BLOCKS(lift_mask_sse2)
#endif
    for (; i < n; i++) { /* the tail (and every byte where there is no vector loop) */
        unsigned char b = c[i];
        if (b >= 0x80 || special[b]) {
            LIFT_CONSIDER(start, i);
            start = i + 1;
        }
    }
    return count; /* a run reaching the end is not quoted on its right: never kept */
}

/* Token `index` (LIFT_TOKEN_LEN bytes) at `out`. */
static void
lift_write_token(char *out, size_t index)
{
    memcpy(out, lift_nonce, LIFT_NONCE_LEN);
    for (int d = 0; d < 8; d++)
        out[LIFT_NONCE_LEN + d] = "0123456789abcdef"[(index >> (4 * (7 - d))) & 0xf];
}

/* Run `index`'s text as a str (ASCII: one byte a character, copied as it is). */
static PyObject *
lift_run_text(const Lift *lift, Py_ssize_t index)
{
    const LiftRun *run = &lift->runs[index];
    PyObject *text = PyUnicode_New(run->end - run->start, 127);
    if (text != NULL)
        memcpy(PyUnicode_DATA(text), lift->body + run->start, (size_t)(run->end - run->start));
    return text;
}

/* The run number `value` is the token of, or -1 if it is not a token. */
static Py_ssize_t
lift_token_index(const Lift *lift, PyObject *value)
{
    if (!PyUnicode_CheckExact(value) || PyUnicode_GET_LENGTH(value) != LIFT_TOKEN_LEN ||
        !PyUnicode_IS_COMPACT_ASCII(value))
        return -1;
    const char *text = (const char *)PyUnicode_DATA(value);
    if (memcmp(text, lift_nonce, LIFT_NONCE_LEN) != 0)
        return -1;
    Py_ssize_t index = 0;
    for (int k = LIFT_NONCE_LEN; k < LIFT_TOKEN_LEN; k++) {
        char h = text[k];
        int digit = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 : -1;
        if (digit < 0)
            return -1;
        index = index * 16 + digit;
    }
    return index < lift->count ? index : -1;
}

/* The str to put where `value` is: a new reference to its run's text, or NULL with no error
 * when `value` is no token, or NULL with an error.  *refused is set when a token is seen twice. */
static PyObject *
lift_replacement(Lift *lift, PyObject *value, int *refused)
{
    Py_ssize_t index = lift_token_index(lift, value);
    if (index < 0)
        return NULL;
    if (lift->seen[index]) {
        *refused = 1;
        return NULL;
    }
    lift->seen[index] = 1;
    lift->found++;
    return lift_run_text(lift, index);
}

static int lift_restore(Lift *lift, PyObject *value, int depth);

/* lift_visit's answers besides 0 (refused) and -1 (error). */
enum { LIFT_KEEP = 1, LIFT_PUT = 2 };

/* One item of a dict or a list, `depth` deep: LIFT_KEEP (nothing to change; a container is
 * walked), or LIFT_PUT with *text a new reference to the run's text to put in its place. */
static int
lift_visit(Lift *lift, PyObject *item, int depth, PyObject **text)
{
    int refused = 0;
    if (PyDict_CheckExact(item) || PyList_CheckExact(item))
        return lift_restore(lift, item, depth + 1);
    if (!PyUnicode_CheckExact(item) || PyUnicode_GET_LENGTH(item) != LIFT_TOKEN_LEN)
        return LIFT_KEEP; /* no token: the walk's common case, kept to two compares */
    *text = lift_replacement(lift, item, &refused);
    if (*text != NULL)
        return LIFT_PUT;
    if (PyErr_Occurred())
        return -1;
    return refused ? 0 : LIFT_KEEP;
}

/* Put each run's text where its token was parsed, in `value` (a dict or a list).
 * 1 done (whatever was found), 0 refused (a token seen twice, or too deep), -1 error. */
static int
lift_restore(Lift *lift, PyObject *value, int depth)
{
    if (depth > LIFT_MAX_DEPTH)
        return 0;
    if (PyDict_CheckExact(value)) {
        Py_ssize_t pos = 0;
        PyObject *key, *item;
        while (PyDict_Next(value, &pos, &key, &item)) {
            PyObject *text = NULL;
            int r = lift_visit(lift, item, depth, &text);
            if (r == LIFT_PUT) {
                /* The key is there already: the dict keeps its size, so the walk may go on. */
                r = PyDict_SetItem(value, key, text) < 0 ? -1 : LIFT_KEEP;
                Py_DECREF(text);
            }
            if (r <= 0)
                return r;
        }
    }
    else if (PyList_CheckExact(value)) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(value); i++) {
            PyObject *text = NULL;
            int r = lift_visit(lift, PyList_GET_ITEM(value, i), depth, &text);
            if (r == LIFT_PUT) {
                PyList_SetItem(value, i, text); /* steals `text`, releases the token */
                r = LIFT_KEEP;
            }
            if (r <= 0)
                return r;
        }
    }
    return 1;
}

#if defined(__GNUC__) || defined(__clang__)
#define LIFT_NOINLINE __attribute__((noinline))
#else
#define LIFT_NOINLINE
#endif

/* lift_loads for a body of LIFT_MIN_BODY bytes or more.  Apart, so that the small bodies'
 * call does not pay for its stack frame (the runs' array). */
static LIFT_NOINLINE PyObject *
lift_loads_large(PyObject *body)
{
    Py_ssize_t n = PyBytes_GET_SIZE(body);
    const unsigned char *c = (const unsigned char *)PyBytes_AS_STRING(body);
    /* On the stack for bodies up to 1 MiB: a heap block allocated between the body and its
     * strings made glibc give back and take again the heap's top at every echo (brk twice,
     * a page fault per page: a third of W3's time). */
    LiftRun local[LIFT_LOCAL_RUNS];
    Py_ssize_t room = n / LIFT_MIN_RUN + 1;
    LiftRun *runs = room <= LIFT_LOCAL_RUNS ? local : PyMem_Malloc(sizeof(LiftRun) * (size_t)room);
    if (runs == NULL)
        return PyErr_NoMemory();
    Py_ssize_t count = lift_find_runs(c, n, runs);
    PyObject *shorter = NULL, *value = NULL;
    unsigned char *seen = NULL;
    if (count == 0)
        goto whole;
    Py_ssize_t lifted = 0;
    for (Py_ssize_t k = 0; k < count; k++)
        lifted += runs[k].end - runs[k].start;
    shorter = PyBytes_FromStringAndSize(NULL, n - lifted + count * LIFT_TOKEN_LEN);
    seen = PyMem_Calloc((size_t)count, 1);
    if (shorter == NULL || seen == NULL) {
        PyErr_NoMemory();
        goto failed;
    }
    char *out = PyBytes_AS_STRING(shorter);
    Py_ssize_t at = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        memcpy(out, c + at, (size_t)(runs[k].start - at));
        out += runs[k].start - at;
        lift_write_token(out, (size_t)k);
        out += LIFT_TOKEN_LEN;
        at = runs[k].end;
    }
    memcpy(out, c + at, (size_t)(n - at));
    value = PyObject_CallOneArg(json_loads, shorter);
    Py_CLEAR(shorter);
    if (value == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            goto failed;
        PyErr_Clear(); /* the whole body's own error is the answer */
        goto refused;
    }
    Lift lift = {(const char *)c, runs, count, 0, seen};
    PyObject *text = lift_replacement(&lift, value, &(int){0});
    if (text != NULL) { /* the body is one string */
        Py_SETREF(value, text);
    }
    else if (PyErr_Occurred()) {
        goto failed;
    }
    else {
        int r = lift_restore(&lift, value, 0);
        if (r < 0)
            goto failed;
        if (r == 0)
            goto refused;
    }
    if (lift.found != count)
        goto refused;
    PyMem_Free(seen);
    if (runs != local)
        PyMem_Free(runs);
    lift_lifted++;
    return value;

refused:
    lift_refused++;
whole:
    Py_CLEAR(value);
    PyMem_Free(seen);
    if (runs != local)
        PyMem_Free(runs);
    return PyObject_CallOneArg(json_loads, body);

failed:
    Py_XDECREF(value);
    Py_XDECREF(shorter);
    PyMem_Free(seen);
    if (runs != local)
        PyMem_Free(runs);
    return NULL;
}

/* `body` (bytes) parsed by json_loads, as if whole, with its long plain strings lifted out
 * first (see the top of this file).  A new reference, or NULL with json_loads's error. */
static PyObject *
lift_loads(PyObject *body)
{
    if (PyBytes_GET_SIZE(body) < LIFT_MIN_BODY)
        return PyObject_CallOneArg(json_loads, body);
    return lift_loads_large(body);
}

/* Import-time set-up: the nonce, from os.urandom.  -1 with an error if it cannot be had. */
static int
lift_init(void)
{
    PyObject *os = PyImport_ImportModule("os");
    PyObject *random = os == NULL ? NULL : PyObject_CallMethod(os, "urandom", "i", 16);
    Py_XDECREF(os);
    if (random == NULL)
        return -1;
    if (!PyBytes_Check(random) || PyBytes_GET_SIZE(random) != LIFT_NONCE_LEN / 2) {
        Py_DECREF(random);
        PyErr_SetString(PyExc_RuntimeError, "os.urandom(16) gave no 16 bytes");
        return -1;
    }
    const unsigned char *r = (const unsigned char *)PyBytes_AS_STRING(random);
    for (int k = 0; k < LIFT_NONCE_LEN / 2; k++) {
        lift_nonce[2 * k] = "0123456789abcdef"[r[k] >> 4];
        lift_nonce[2 * k + 1] = "0123456789abcdef"[r[k] & 0xf];
    }
    Py_DECREF(random);
    return 0;
}
