/* heartbeatd.wire._speedups: the int32 decoder and the connection's hot-path loop, in C.
 *
 * The pure-Python twins are the reference: heartbeatd/wire/int32.py (PyInt32Decoder) and the
 * fast path inlined in heartbeatd/server/connection.py (Connection._deliver).  This module
 * must answer byte for byte as they do (tests/test_speedups.py checks it for any frames and
 * any read splits); HEARTBEATD_NO_EXTENSIONS=1 selects the Python twins.
 *
 * It parses hostile input: every length is checked against what is held before it is used,
 * a header announcing more than max_frame_bytes is refused before a body byte is kept, and a
 * body is held in a buffer that grows with the bytes received (at most twice them), never
 * with the length a peer announces.  JSON itself is parsed by the JSON library the Python
 * path uses (orjson), called from here: one parser, one set of edge cases.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#ifndef _WIN32
#include <sys/ioctl.h>
#include <sys/socket.h>
#define HAVE_READ_EVENT 1
#endif
#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* Python ignores SIGPIPE anyway */
#endif

/* heartbeatd.wire.framing.FrameTooLarge, imported once at module init. */
static PyObject *FrameTooLarge = NULL;
/* The Int32Decoder class (read_event works on its instances directly). */
static PyTypeObject *DecoderType = NULL;
/* Set by configure(): the Request class, the JSON functions, the depth check. */
static PyObject *RequestType = NULL;
static PyObject *json_loads = NULL;
static PyObject *json_dumps = NULL;
static PyObject *exceeds_depth = NULL;
/* Request's four slots, filled directly when Request is the plain __slots__ class that
 * handlers.py defines (its __init__ only stores its four arguments; a test checks that):
 * the offsets of type, id, data, _connection, or request_fast == 0 to call the class. */
static Py_ssize_t request_offsets[4];
static int request_fast = 0;
/* type string -> the reply's opening bytes, b'{"type":"echo"' (encoded by json_dumps). */
static PyObject *reply_prefixes = NULL;
/* dict.get's C function: a `lookup` that is some dict's bound get is read directly. */
static PyCFunction dict_get_function = NULL;
#define MAX_REPLY_PREFIXES 1024
/* Interned names. */
static PyObject *s_type, *s_id, *s_data, *s_pending, *s_emit, *s_handle_item, *s_fast_failed,
    *s_fast_result, *s_fast_path;

/* ------------------------------------------------------------------------------------------ */
/* Int32Decoder                                                                               */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    Py_ssize_t max_frame_bytes;
    Py_ssize_t large_body;
    PyObject *error;       /* a FramingError, or None */
    Py_ssize_t buffered;   /* bytes held for an unfinished frame (header included) */
    unsigned char head[4]; /* an unfinished header */
    Py_ssize_t head_have;  /* its bytes held (4: the header is complete) */
    Py_ssize_t length;     /* the body length, once head_have == 4 */
    PyObject *body;        /* bytes being filled (capacity `cap`), or NULL */
    Py_ssize_t cap;
    PyObject *chunks;      /* a large body's pieces (see decoder_append), or NULL */
    Py_ssize_t have;       /* body bytes received */
} Decoder;

static void
decoder_reset(Decoder *self)
{
    Py_CLEAR(self->body);
    Py_CLEAR(self->chunks);
    self->head_have = 0;
    self->length = 0;
    self->cap = 0;
    self->have = 0;
    self->buffered = 0;
}

static int
decoder_init(Decoder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"max_frame_bytes", "large_body", NULL};
    Py_ssize_t max_frame_bytes, large_body = 64 * 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n|n", kwlist, &max_frame_bytes, &large_body))
        return -1;
    self->max_frame_bytes = max_frame_bytes;
    self->large_body = large_body;
    Py_INCREF(Py_None);
    Py_XSETREF(self->error, Py_None);
    decoder_reset(self);
    return 0;
}

static int
decoder_traverse(Decoder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->error);
    Py_VISIT(self->chunks);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int
decoder_clear(Decoder *self)
{
    Py_CLEAR(self->error);
    Py_CLEAR(self->body);
    Py_CLEAR(self->chunks);
    return 0;
}

static void
decoder_dealloc(Decoder *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    decoder_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* Refuse a header: set `error` (as the Python decoder does) and drop what is held. */
static int
decoder_refuse(Decoder *self, uint32_t length)
{
    PyObject *error = PyObject_CallFunction(FrameTooLarge, "kn", (unsigned long)length,
                                            self->max_frame_bytes);
    if (error == NULL)
        return -1;
    Py_XSETREF(self->error, error);
    decoder_reset(self);
    return 0;
}

/* `length > max_frame_bytes`, compared as Python compares them (a negative limit refuses
 * everything, as it does there). */
static inline int
too_large(Decoder *self, uint32_t length)
{
    return (long long)length > (long long)self->max_frame_bytes;
}

static inline uint32_t
read_be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

/* Reads shorter than this are copied into the large body's trailing bytearray rather than
 * kept as objects (int32.py's _SHORT_READ). */
#define SHORT_READ (16 * 1024)

/* A large body (at least large_body bytes), as int32.py gathers it: a long read of immutable
 * bytes is kept by reference, as (read, start, size); short reads are copied into a trailing
 * bytearray. The body is copied once, when it is complete: no buffer is grown and copied. */
static int
decoder_gather(Decoder *self, const char *p, Py_ssize_t n, PyObject *owner)
{
    if (n == 0)
        return 0;
    if (self->chunks == NULL && (self->chunks = PyList_New(0)) == NULL)
        return -1;
    Py_ssize_t k = PyList_GET_SIZE(self->chunks);
    PyObject *piece;
    if (n >= SHORT_READ && owner != NULL) {
        Py_ssize_t start = (Py_ssize_t)(p - PyBytes_AS_STRING(owner));
        piece = Py_BuildValue("(Onn)", owner, start, n);
    }
    else {
        PyObject *last = k ? PyList_GET_ITEM(self->chunks, k - 1) : NULL;
        if (last != NULL && PyByteArray_CheckExact(last)) {
            Py_ssize_t size = PyByteArray_GET_SIZE(last);
            if (PyByteArray_Resize(last, size + n) < 0)
                return -1;
            memcpy(PyByteArray_AS_STRING(last) + size, p, (size_t)n);
            self->have += n;
            return 0;
        }
        piece = PyByteArray_FromStringAndSize(p, n);
    }
    if (piece == NULL)
        return -1;
    int r = PyList_Append(self->chunks, piece);
    Py_DECREF(piece);
    if (r < 0)
        return -1;
    self->have += n;
    return 0;
}

/* Append `n` body bytes (inside `owner`, when that is immutable bytes) to the unfinished
 * frame. A body shorter than large_body is copied into a buffer that grows to at most twice
 * the bytes received (never to the announced length at once: a header costs us nothing). */
static int
decoder_append(Decoder *self, const char *p, Py_ssize_t n, PyObject *owner)
{
    if (self->length >= self->large_body && self->length > 0 && self->body == NULL)
        return decoder_gather(self, p, n, owner); /* (read_into_body may have made `body`) */
    Py_ssize_t needed = self->have + n; /* <= length <= max_frame_bytes */
    if (needed > self->cap) {
        Py_ssize_t cap = self->cap > PY_SSIZE_T_MAX / 2 ? needed : self->cap * 2;
        if (cap < needed)
            cap = needed;
        if (cap < 256)
            cap = 256;
        if (cap > self->length || self->length - cap < self->length / 8)
            cap = self->length;
        if (self->body == NULL) {
            self->body = PyBytes_FromStringAndSize(NULL, cap);
            if (self->body == NULL)
                return -1;
        }
        else if (_PyBytes_Resize(&self->body, cap) < 0) {
            return -1; /* body is NULL now */
        }
        self->cap = cap;
    }
    if (n) {
        memcpy(PyBytes_AS_STRING(self->body) + self->have, p, (size_t)n);
        self->have = needed;
    }
    return 0;
}

/* Copy a large body's gathered pieces (decoder_gather) into `out`, which has room for
 * `room` bytes: 0, or -1 with an exception if they do not fit (they always do: they sum to
 * `have`, and callers give at least that). */
static int
copy_pieces(Decoder *self, char *out, Py_ssize_t room)
{
    Py_ssize_t at = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(self->chunks); i++) {
        PyObject *piece = PyList_GET_ITEM(self->chunks, i);
        const char *from;
        Py_ssize_t size;
        if (PyByteArray_CheckExact(piece)) {
            from = PyByteArray_AS_STRING(piece);
            size = PyByteArray_GET_SIZE(piece);
        }
        else { /* (read, start, size) */
            PyObject *owner = PyTuple_GET_ITEM(piece, 0);
            Py_ssize_t start = PyLong_AsSsize_t(PyTuple_GET_ITEM(piece, 1));
            size = PyLong_AsSsize_t(PyTuple_GET_ITEM(piece, 2));
            from = PyBytes_AS_STRING(owner) + start;
        }
        if (size < 0 || size > room - at) {
            PyErr_SetString(PyExc_SystemError, "heartbeatd decoder: body pieces overflow");
            return -1;
        }
        memcpy(out + at, from, (size_t)size);
        at += size;
    }
    return 0;
}

/* The finished body of the unfinished frame, handed over (new reference). */
static PyObject *
decoder_take(Decoder *self)
{
    PyObject *body;
    if (self->chunks != NULL) {
        body = PyBytes_FromStringAndSize(NULL, self->length);
        if (body == NULL)
            return NULL;
        if (copy_pieces(self, PyBytes_AS_STRING(body), self->length) < 0) {
            Py_DECREF(body);
            return NULL;
        }
        Py_CLEAR(self->chunks);
    }
    else if (self->length == 0) {
        body = PyBytes_FromStringAndSize(NULL, 0);
    }
    else {
        body = self->body; /* cap == length == have here */
        self->body = NULL;
    }
    self->head_have = 0;
    self->length = 0;
    self->cap = 0;
    self->have = 0;
    return body;
}

static PyObject *
decoder_feed(Decoder *self, PyObject *arg)
{
    Py_buffer view;
    PyObject *frames;
    const char *p;
    Py_ssize_t n, off = 0;

    if (self->error != Py_None)
        return PyList_New(0);
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    p = (const char *)view.buf;
    n = view.len;
    /* Immutable bytes may be kept by reference (a large body's long reads). */
    PyObject *owner = PyBytes_CheckExact(arg) ? arg : NULL;
    frames = PyList_New(0);
    if (frames == NULL)
        goto fail;

    if (self->head_have) {
        /* A frame begun in an earlier read. */
        if (self->head_have < 4) {
            Py_ssize_t take = 4 - self->head_have;
            if (take > n)
                take = n;
            memcpy(self->head + self->head_have, p, (size_t)take);
            self->head_have += take;
            off = take;
            if (self->head_have < 4) {
                self->buffered = self->head_have;
                goto done;
            }
            uint32_t length = read_be32(self->head);
            if (too_large(self, length)) {
                if (decoder_refuse(self, length) < 0)
                    goto fail;
                goto done;
            }
            self->length = (Py_ssize_t)length;
        }
        Py_ssize_t take = self->length - self->have;
        if (take > n - off)
            take = n - off;
        if (decoder_append(self, p + off, take, owner) < 0) {
            decoder_reset(self);
            goto fail;
        }
        off += take;
        if (self->have < self->length) {
            self->buffered = 4 + self->have;
            goto done;
        }
        /* As the Python decoder does, a buffered (not gathered) frame is checked again
         * against the limit when it completes: a reload may have lowered it meanwhile. */
        if (self->length < self->large_body && self->length > self->max_frame_bytes) {
            if (decoder_refuse(self, (uint32_t)self->length) < 0)
                goto fail;
            goto done;
        }
        PyObject *body = decoder_take(self);
        if (body == NULL)
            goto fail;
        int r = PyList_Append(frames, body);
        Py_DECREF(body);
        if (r < 0)
            goto fail;
    }

    /* Whole frames. */
    while (n - off >= 4) {
        uint32_t length = read_be32((const unsigned char *)p + off);
        if (too_large(self, length)) {
            if (decoder_refuse(self, length) < 0)
                goto fail;
            goto done;
        }
        if ((Py_ssize_t)length > n - off - 4)
            break;
        PyObject *body = PyBytes_FromStringAndSize(p + off + 4, (Py_ssize_t)length);
        if (body == NULL)
            goto fail;
        int r = PyList_Append(frames, body);
        Py_DECREF(body);
        if (r < 0)
            goto fail;
        off += 4 + (Py_ssize_t)length;
    }

    /* The start of a frame: keep it. */
    if (off < n) {
        Py_ssize_t tail = n - off;
        if (tail < 4) {
            memcpy(self->head, p + off, (size_t)tail);
            self->head_have = tail;
        }
        else {
            memcpy(self->head, p + off, 4);
            self->head_have = 4;
            self->length = (Py_ssize_t)read_be32(self->head); /* checked in the loop */
            if (decoder_append(self, p + off + 4, tail - 4, owner) < 0) {
                decoder_reset(self);
                goto fail;
            }
        }
        self->buffered = tail;
    }
    else {
        self->buffered = 0;
    }

done:
    PyBuffer_Release(&view);
    return frames;
fail:
    PyBuffer_Release(&view);
    Py_XDECREF(frames);
    return NULL;
}

static PyObject *
decoder_get_error(Decoder *self, void *closure)
{
    (void)closure;
    Py_INCREF(self->error);
    return self->error;
}

static int
decoder_set_error(Decoder *self, PyObject *value, void *closure)
{
    (void)closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete error");
        return -1;
    }
    Py_INCREF(value);
    Py_XSETREF(self->error, value);
    return 0;
}

static PyGetSetDef decoder_getset[] = {
    {"error", (getter)decoder_get_error, (setter)decoder_set_error,
     "Why the stream cannot be framed any more, or None.", NULL},
    {NULL},
};

static PyMemberDef decoder_members[] = {
    {"max_frame_bytes", T_PYSSIZET, offsetof(Decoder, max_frame_bytes), 0, NULL},
    {"large_body", T_PYSSIZET, offsetof(Decoder, large_body), 0, NULL},
    {"buffered", T_PYSSIZET, offsetof(Decoder, buffered), READONLY, NULL},
    {NULL},
};

static PyMethodDef decoder_methods[] = {
    {"feed", (PyCFunction)decoder_feed, METH_O,
     "feed(data) -> the frame bodies this read completed, in order."},
    {NULL},
};

static PyType_Slot decoder_slots[] = {
    {Py_tp_doc, "The int32 decoder in C (heartbeatd.wire.int32.PyInt32Decoder is the reference)."},
    {Py_tp_init, decoder_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, decoder_dealloc},
    {Py_tp_traverse, decoder_traverse},
    {Py_tp_clear, decoder_clear},
    {Py_tp_methods, decoder_methods},
    {Py_tp_members, decoder_members},
    {Py_tp_getset, decoder_getset},
    {0, NULL},
};

static PyType_Spec decoder_spec = {
    .name = "heartbeatd.wire._speedups.Int32Decoder",
    .basicsize = sizeof(Decoder),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = decoder_slots,
};

/* ------------------------------------------------------------------------------------------ */
/* serve(): the connection's fast path (Connection._deliver's inlined loop)                   */
/* ------------------------------------------------------------------------------------------ */

/* Call connection.<name>(args...) with the exception being handled set to the one raised, so
 * that Failure() there sees it (as it would in the Python path's `except Exception:`). */
static int
call_with_handled(PyObject *connection, PyObject *name, PyObject *const *args, size_t nargs)
{
    PyObject *r;
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
    PyObject *old = PyErr_GetHandledException();
    PyErr_SetHandledException(exc);
#else
    PyObject *et, *ev, *etb;
    PyErr_Fetch(&et, &ev, &etb);
    PyErr_NormalizeException(&et, &ev, &etb);
    if (etb != NULL && ev != NULL)
        PyException_SetTraceback(ev, etb);
    PyObject *ot, *ov, *otb;
    PyErr_GetExcInfo(&ot, &ov, &otb);
    PyErr_SetExcInfo(et, ev, etb); /* steals */
#endif
    PyObject *stack[4];
    stack[0] = connection;
    for (size_t i = 0; i < nargs && i < 3; i++)
        stack[i + 1] = args[i];
    r = PyObject_VectorcallMethod(name, stack, (nargs + 1) | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                  NULL);
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetHandledException(old);
    Py_XDECREF(old);
    Py_XDECREF(exc);
#else
    PyErr_SetExcInfo(ot, ov, otb); /* steals */
#endif
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static int
call_method(PyObject *connection, PyObject *name, PyObject *const *args, size_t nargs)
{
    PyObject *stack[5];
    stack[0] = connection;
    for (size_t i = 0; i < nargs && i < 4; i++)
        stack[i + 1] = args[i];
    PyObject *r = PyObject_VectorcallMethod(
        name, stack, (nargs + 1) | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static inline int
is_plain_result(PyObject *r)
{
    return r == Py_None || PyDict_CheckExact(r) || PyList_CheckExact(r) ||
           PyUnicode_CheckExact(r) || PyLong_CheckExact(r) || PyFloat_CheckExact(r) ||
           PyBool_Check(r);
}

/* The framed reply: a 4-byte big-endian length and the body, or header(len) + body. */
static PyObject *
frame_reply(PyObject *header, PyObject *body)
{
    Py_ssize_t size = PyBytes_GET_SIZE(body);
    if (header != Py_None) {
        PyObject *len = PyLong_FromSsize_t(size);
        if (len == NULL)
            return NULL;
        PyObject *head = PyObject_CallOneArg(header, len);
        Py_DECREF(len);
        if (head == NULL)
            return NULL;
        PyObject *frame = PyNumber_Add(head, body);
        Py_DECREF(head);
        return frame;
    }
    if ((uint64_t)size > 0xFFFFFFFFu) {
        PyErr_SetString(PyExc_OverflowError, "a reply longer than 4 GiB cannot be framed");
        return NULL;
    }
    PyObject *frame = PyBytes_FromStringAndSize(NULL, size + 4);
    if (frame == NULL)
        return NULL;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(frame);
    uint32_t n = (uint32_t)size;
    out[0] = (unsigned char)(n >> 24);
    out[1] = (unsigned char)(n >> 16);
    out[2] = (unsigned char)(n >> 8);
    out[3] = (unsigned char)n;
    memcpy(out + 4, PyBytes_AS_STRING(body), (size_t)size);
    return frame;
}

/* A Request(type_, id_, data, connection), as Request.__init__ would build it.  `*spare` is
 * a Request this read built before whose handler kept no reference to it (only ours is
 * left, and it has no weak references or dict): its slots were emptied, and it is filled
 * again rather than freed and allocated anew (see release_request). */
static PyObject *
new_request(PyObject *type_, PyObject *id_, PyObject *data, PyObject *connection,
            PyObject **spare)
{
    PyObject *args[4] = {type_, id_, data, connection};
    if (!request_fast)
        return PyObject_Vectorcall(RequestType, args, 4, NULL);
    PyObject *request = *spare;
    if (request != NULL) {
        *spare = NULL;
    }
    else {
        PyTypeObject *tp = (PyTypeObject *)RequestType;
        request = tp->tp_alloc(tp, 0);
        if (request == NULL)
            return NULL;
    }
    for (int i = 0; i < 4; i++) {
        Py_INCREF(args[i]);
        *(PyObject **)((char *)request + request_offsets[i]) = args[i];
    }
    return request;
}

/* Done with a request: if the handler kept no reference to it, empty its slots (what it
 * held is freed now, as when it is deallocated) and keep it in `*spare` for the next body. */
static void
release_request(PyObject *request, PyObject **spare)
{
    if (request == NULL)
        return;
    if (!request_fast || *spare != NULL || Py_REFCNT(request) != 1 ||
        Py_TYPE(request) != (PyTypeObject *)RequestType) {
        Py_DECREF(request);
        return;
    }
    for (int i = 0; i < 4; i++)
        Py_CLEAR(*(PyObject **)((char *)request + request_offsets[i]));
    *spare = request;
}

/* b'{"type":<type_>' for a reply, cached per message type (a type with a handler: as many
 * as the application registers; the cache is emptied past MAX_REPLY_PREFIXES). */
static PyObject *
reply_prefix(PyObject *type_)
{
    PyObject *prefix = PyDict_GetItemWithError(reply_prefixes, type_);
    if (prefix != NULL) {
        Py_INCREF(prefix);
        return prefix;
    }
    if (PyErr_Occurred())
        return NULL;
    PyObject *one = PyDict_New();
    if (one == NULL)
        return NULL;
    if (PyDict_SetItem(one, s_type, type_) < 0) {
        Py_DECREF(one);
        return NULL;
    }
    PyObject *encoded = PyObject_CallOneArg(json_dumps, one); /* b'{"type":"echo"}' */
    Py_DECREF(one);
    if (encoded == NULL)
        return NULL;
    if (!PyBytes_CheckExact(encoded) || PyBytes_GET_SIZE(encoded) < 2) {
        Py_DECREF(encoded);
        PyErr_SetString(PyExc_TypeError, "the JSON encoder returned no bytes");
        return NULL;
    }
    prefix = PyBytes_FromStringAndSize(PyBytes_AS_STRING(encoded), PyBytes_GET_SIZE(encoded) - 1);
    Py_DECREF(encoded);
    if (prefix == NULL)
        return NULL;
    if (PyDict_GET_SIZE(reply_prefixes) >= MAX_REPLY_PREFIXES)
        PyDict_Clear(reply_prefixes);
    if (PyDict_SetItem(reply_prefixes, type_, prefix) < 0) {
        Py_DECREF(prefix);
        return NULL;
    }
    return prefix;
}

/* `v` in decimal, as the encoder writes an integer; returns its length (at most 20). */
static Py_ssize_t
format_int(char *out, long long v)
{
    char digits[24];
    int n = 0;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        digits[n++] = (char)('0' + (int)(u % 10));
        u /= 10;
    } while (u);
    Py_ssize_t len = 0;
    if (v < 0)
        out[len++] = '-';
    while (n)
        out[len++] = digits[--n];
    return len;
}

/* 1 for the ASCII bytes that are not written as themselves (or might not be: DEL). */
static unsigned char special[128];

#if defined(__SSE2__)
#include <emmintrin.h>
/* With SSE2 (every x86-64), the scan below takes 16 bytes a step, faster than the
 * encoder's own: any plain string is written without calling it. */
#define PLAIN_STRING_MAX PY_SSIZE_T_MAX
#else
/* Strings up to this long that need no escape are written without calling the encoder (past
 * it, the encoder's own vectorised scan is faster than ours). */
#define PLAIN_STRING_MAX 4096
#endif

/* 1 if none of the `n` ASCII bytes at `c` is special. */
static int
plain_bytes(const unsigned char *c, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    unsigned char any = 0;
#if defined(__SSE2__)
    /* ASCII bytes are 0-0x7f, so the signed compare with 0x20 finds the control bytes. */
    const __m128i space = _mm_set1_epi8(0x20), quote = _mm_set1_epi8('"'),
                  backslash = _mm_set1_epi8('\\'), del = _mm_set1_epi8(0x7f);
#define SPECIAL16(v)                                                                         \
    _mm_or_si128(_mm_or_si128(_mm_cmplt_epi8(v, space), _mm_cmpeq_epi8(v, quote)),          \
                 _mm_or_si128(_mm_cmpeq_epi8(v, backslash), _mm_cmpeq_epi8(v, del)))
    for (; i + 64 <= n; i += 64) { /* one test per 64 bytes: long strings (W3) */
        __m128i a = _mm_loadu_si128((const __m128i *)(c + i)),
                b = _mm_loadu_si128((const __m128i *)(c + i + 16)),
                d = _mm_loadu_si128((const __m128i *)(c + i + 32)),
                e = _mm_loadu_si128((const __m128i *)(c + i + 48));
        __m128i bad = _mm_or_si128(_mm_or_si128(SPECIAL16(a), SPECIAL16(b)),
                                   _mm_or_si128(SPECIAL16(d), SPECIAL16(e)));
        if (_mm_movemask_epi8(bad))
            return 0;
    }
    for (; i + 16 <= n; i += 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(c + i));
        if (_mm_movemask_epi8(SPECIAL16(v)))
            return 0;
    }
#undef SPECIAL16
#endif
    for (; i < n; i++)
        any |= special[c[i] & 0x7f]; /* ASCII: c[i] < 0x80 */
    return !any;
}

/* Strings at least this long are copied and checked in one pass (copy_plain), not scanned
 * and then copied: a long echo (W3) reads its 256 KiB once instead of twice. */
#define CHECKED_COPY_MIN 1024

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX2_COPY 1
/* Set at import when the CPU (and the OS) has AVX2. */
static int have_avx2 = 0;

/* copy_plain's first part with AVX2, 64 bytes a step: how many bytes it checked and copied
 * (a multiple of 64; it stops before the first block holding a special byte). */
__attribute__((target("avx2"))) static Py_ssize_t
copy_plain_avx2(char *out, const unsigned char *c, Py_ssize_t n)
{
    const __m256i space = _mm256_set1_epi8(0x20), quote = _mm256_set1_epi8('"'),
                  backslash = _mm256_set1_epi8('\\'), del = _mm256_set1_epi8(0x7f);
    Py_ssize_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(c + i)),
                b = _mm256_loadu_si256((const __m256i *)(c + i + 32));
        /* ASCII bytes are 0-0x7f, so the signed compare with 0x20 finds the control bytes. */
        __m256i bad = _mm256_or_si256(
            _mm256_or_si256(
                _mm256_or_si256(_mm256_cmpgt_epi8(space, a), _mm256_cmpeq_epi8(a, quote)),
                _mm256_or_si256(_mm256_cmpeq_epi8(a, backslash), _mm256_cmpeq_epi8(a, del))),
            _mm256_or_si256(
                _mm256_or_si256(_mm256_cmpgt_epi8(space, b), _mm256_cmpeq_epi8(b, quote)),
                _mm256_or_si256(_mm256_cmpeq_epi8(b, backslash), _mm256_cmpeq_epi8(b, del))));
        if (_mm256_movemask_epi8(bad))
            break;
        _mm256_storeu_si256((__m256i *)(out + i), a);
        _mm256_storeu_si256((__m256i *)(out + i + 32), b);
    }
    return i;
}
#endif

/* Copy `n` ASCII bytes from `c` to `out`, checking them on the way: 1 if none is special
 * (all copied), 0 at the first block that holds one (`out` then partly written). */
static int
copy_plain(char *out, const unsigned char *c, Py_ssize_t n)
{
    Py_ssize_t i = 0;
#ifdef HAVE_AVX2_COPY
    if (have_avx2)
        i = copy_plain_avx2(out, c, n); /* the rest (and a block it stopped at) below */
#endif
#if defined(__SSE2__)
    const __m128i space = _mm_set1_epi8(0x20), quote = _mm_set1_epi8('"'),
                  backslash = _mm_set1_epi8('\\'), del = _mm_set1_epi8(0x7f);
#define SPECIAL16(v)                                                                         \
    _mm_or_si128(_mm_or_si128(_mm_cmplt_epi8(v, space), _mm_cmpeq_epi8(v, quote)),          \
                 _mm_or_si128(_mm_cmpeq_epi8(v, backslash), _mm_cmpeq_epi8(v, del)))
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(c + i)),
                b = _mm_loadu_si128((const __m128i *)(c + i + 16)),
                d = _mm_loadu_si128((const __m128i *)(c + i + 32)),
                e = _mm_loadu_si128((const __m128i *)(c + i + 48));
        __m128i bad = _mm_or_si128(_mm_or_si128(SPECIAL16(a), SPECIAL16(b)),
                                   _mm_or_si128(SPECIAL16(d), SPECIAL16(e)));
        if (_mm_movemask_epi8(bad))
            return 0;
        _mm_storeu_si128((__m128i *)(out + i), a);
        _mm_storeu_si128((__m128i *)(out + i + 16), b);
        _mm_storeu_si128((__m128i *)(out + i + 32), d);
        _mm_storeu_si128((__m128i *)(out + i + 48), e);
    }
#undef SPECIAL16
#endif
    for (; i < n; i++) {
        if (special[c[i] & 0x7f]) /* ASCII: c[i] < 0x80 */
            return 0;
        out[i] = (char)c[i];
    }
    return 1;
}

/* Long plain strings lifted out of a body before the JSON parser sees it (lift_loads). */
#include "_lift.h"

/* 1 if `value` is a str the encoder would write as its own characters between quotes:
 * printable ASCII (0x20-0x7e) without '"' or '\\'; 0 if not (the encoder writes it); -1 error. */
static int
plain_ascii(PyObject *value)
{
    if (!PyUnicode_CheckExact(value))
        return 0;
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(value) < 0)
        return -1;
#endif
    if (!PyUnicode_IS_ASCII(value) || PyUnicode_GET_LENGTH(value) > PLAIN_STRING_MAX)
        return 0;
    return plain_bytes((const unsigned char *)PyUnicode_DATA(value), PyUnicode_GET_LENGTH(value));
}

/* The reply body {"type":..,"id":..,"data":..} as json_dumps would encode that dict, written
 * after `room` spare bytes (for the int32 header).  Returns NULL with an exception if the
 * encoder raised (the caller answers as for a failing handler), or NULL with no exception
 * when this id is not one we format here (the caller encodes the dict instead). */
static PyObject *
encode_reply(PyObject *type_, PyObject *id_, PyObject *result, Py_ssize_t room)
{
    char number[32];
    Py_ssize_t id_len = 0;
    const char *id_text = NULL;
    PyObject *id_encoded = NULL, *prefix, *wrapped, *data, *out = NULL;

    if (id_ != NULL) {
        if (PyLong_CheckExact(id_)) {
            int overflow;
            long long v = PyLong_AsLongLongAndOverflow(id_, &overflow);
            if (v == -1 && PyErr_Occurred())
                return NULL;
            if (overflow)
                return NULL; /* past 64 bits: the dict path, whose encoder decides */
            id_len = format_int(number, v);
            id_text = number;
        }
        else {
            id_encoded = PyObject_CallOneArg(json_dumps, id_); /* a str */
            if (id_encoded == NULL)
                return NULL;
            if (!PyBytes_CheckExact(id_encoded)) {
                Py_DECREF(id_encoded);
                PyErr_SetString(PyExc_TypeError, "the JSON encoder returned no bytes");
                return NULL;
            }
            id_len = PyBytes_GET_SIZE(id_encoded);
            id_text = PyBytes_AS_STRING(id_encoded);
        }
    }
    const char *data_text;
    Py_ssize_t dlen;
    /* A long ASCII string is assumed plain and checked while it is copied (copy_plain); if
     * it is not, the reply is made again with the encoder's text. */
    int checked = PyUnicode_CheckExact(result) &&
#if PY_VERSION_HEX < 0x030C0000
                  PyUnicode_IS_READY(result) &&
#endif
                  PyUnicode_IS_ASCII(result) && PyUnicode_GET_LENGTH(result) >= CHECKED_COPY_MIN &&
                  PyUnicode_GET_LENGTH(result) <= PLAIN_STRING_MAX;
    int quote = checked ? 1 : plain_ascii(result);
    if (quote < 0) {
        Py_XDECREF(id_encoded);
        return NULL;
    }
encode:
    if (quote) { /* written as the encoder writes it: between quotes, unchanged */
        data = NULL;
        data_text = (const char *)PyUnicode_DATA(result);
        dlen = PyUnicode_GET_LENGTH(result);
    }
    else {
        /* [result]: the value at the depth it has inside the reply object, so the encoder's
         * nesting limit refuses exactly what it would refuse in the dict. */
        wrapped = PyList_New(1);
        if (wrapped == NULL) {
            Py_XDECREF(id_encoded);
            return NULL;
        }
        Py_INCREF(result);
        PyList_SET_ITEM(wrapped, 0, result);
        data = PyObject_CallOneArg(json_dumps, wrapped);
        Py_DECREF(wrapped);
        if (data == NULL) {
            Py_XDECREF(id_encoded);
            return NULL;
        }
        if (!PyBytes_CheckExact(data) || PyBytes_GET_SIZE(data) < 2) {
            Py_DECREF(data);
            Py_XDECREF(id_encoded);
            PyErr_SetString(PyExc_TypeError, "the JSON encoder returned no bytes");
            return NULL;
        }
        data_text = PyBytes_AS_STRING(data) + 1;
        dlen = PyBytes_GET_SIZE(data) - 2;
    }
    prefix = reply_prefix(type_);
    if (prefix == NULL)
        goto done;
    {
        static const char ID[] = ",\"id\":", DATA[] = ",\"data\":";
        Py_ssize_t plen = PyBytes_GET_SIZE(prefix);
        Py_ssize_t size = room + plen + (id_text ? (Py_ssize_t)sizeof ID - 1 + id_len : 0) +
                          (Py_ssize_t)sizeof DATA - 1 + dlen + 2 * quote + 1;
        out = PyBytes_FromStringAndSize(NULL, size);
        if (out == NULL)
            goto done;
        char *w = PyBytes_AS_STRING(out) + room;
        memcpy(w, PyBytes_AS_STRING(prefix), (size_t)plen);
        w += plen;
        if (id_text) {
            memcpy(w, ID, sizeof ID - 1);
            w += sizeof ID - 1;
            memcpy(w, id_text, (size_t)id_len);
            w += id_len;
        }
        memcpy(w, DATA, sizeof DATA - 1);
        w += sizeof DATA - 1;
        if (quote)
            *w++ = '"';
        if (checked) {
            if (!copy_plain(w, (const unsigned char *)data_text, dlen)) {
                /* Not plain after all: the encoder writes it. */
                Py_CLEAR(out);
                Py_CLEAR(prefix);
                checked = quote = 0;
                goto encode;
            }
        }
        else
            memcpy(w, data_text, (size_t)dlen);
        w += dlen;
        if (quote)
            *w++ = '"';
        *w = '}';
    }
done:
    Py_XDECREF(prefix);
    Py_XDECREF(data);
    Py_XDECREF(id_encoded);
    return out;
}

static inline void
write_be32(unsigned char *out, uint32_t n)
{
    out[0] = (unsigned char)(n >> 24);
    out[1] = (unsigned char)(n >> 16);
    out[2] = (unsigned char)(n >> 8);
    out[3] = (unsigned char)n;
}

/* What serve() works with for one read. */
typedef struct {
    PyObject *connection, *lookup, *batch, *max_depth, *header;
    /* `lookup`'s dict when it is that dict's bound get (read directly), else NULL. */
    PyObject *handlers;
    Py_ssize_t deep_enough;
    /* The offset of the connection's `_pending` slot when it may be read directly, else 0. */
    Py_ssize_t pending_offset;
    PyObject *spare; /* an emptied Request to fill again (new_request), or NULL */
} Serving;

/* connection._pending, as `self._pending` reads it (new reference). */
static PyObject *
get_pending(Serving *sv)
{
    if (sv->pending_offset) {
        PyObject *pending = *(PyObject **)((char *)sv->connection + sv->pending_offset);
        if (pending != NULL) {
            Py_INCREF(pending);
            return pending;
        }
    }
    return PyObject_GetAttr(sv->connection, s_pending); /* unset: raises as Python does */
}

/* The offset of `_pending` in `connection` when reading the slot is what reading the
 * attribute does: a plain slot of its class, generic attribute access. Else 0. */
static Py_ssize_t
pending_slot(PyObject *connection)
{
    PyTypeObject *tp = Py_TYPE(connection);
    if (tp->tp_getattro != PyObject_GenericGetAttr)
        return 0;
    PyObject *descr = _PyType_Lookup(tp, s_pending); /* borrowed */
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type))
        return 0;
    PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
    if (member->type != T_OBJECT_EX || member->offset <= 0 ||
        !PyObject_TypeCheck(connection, PyDescr_TYPE(descr)))
        return 0;
    return member->offset;
}

/* lookup(type_): the handler or None (new reference). */
static PyObject *
find_handler(Serving *sv, PyObject *type_)
{
    if (sv->handlers != NULL) {
        PyObject *handler = PyDict_GetItemWithError(sv->handlers, type_);
        if (handler == NULL) {
            if (PyErr_Occurred())
                return NULL;
            handler = Py_None;
        }
        Py_INCREF(handler);
        return handler;
    }
    return PyObject_CallOneArg(sv->lookup, type_);
}

/* One body: 1 answered on the fast path, 0 handed to the general path, -1 error. */
static int
serve_one(Serving *sv, PyObject *item)
{
    PyObject *connection = sv->connection, *batch = sv->batch, *max_depth = sv->max_depth,
             *header = sv->header;
    Py_ssize_t deep_enough = sv->deep_enough;
    PyObject *value = NULL, *handler = NULL, *request = NULL, *result = NULL, *reply = NULL,
             *body = NULL;
    PyObject *type_, *id_, *data;
    int status = -1;

    if (!PyBytes_CheckExact(item))
        return call_method(connection, s_handle_item, &item, 1); /* a framing token */
    value = lift_loads(item);
    if (value == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError))
            return -1;
        PyErr_Clear();
        return call_method(connection, s_handle_item, &item, 1);
    }
    if (!PyDict_CheckExact(value))
        goto general;
    if (PyBytes_GET_SIZE(item) >= deep_enough) {
        PyObject *args[3] = {value, item, max_depth};
        PyObject *deep = PyObject_Vectorcall(exceeds_depth, args, 3, NULL);
        if (deep == NULL)
            goto done;
        int is_deep = PyObject_IsTrue(deep);
        Py_DECREF(deep);
        if (is_deep < 0)
            goto done;
        if (is_deep)
            goto general;
    }
    /* Borrowed: `value` holds them while we use them. */
    type_ = PyDict_GetItemWithError(value, s_type);
    if (type_ == NULL && PyErr_Occurred())
        goto done;
    id_ = PyDict_GetItemWithError(value, s_id);
    if (id_ == NULL && PyErr_Occurred())
        goto done;
    if (type_ == NULL || !PyUnicode_CheckExact(type_))
        goto general;
    handler = find_handler(sv, type_);
    if (handler == NULL)
        goto done;
    if (handler == Py_None)
        goto general;
    if (id_ == Py_None)
        id_ = NULL;
    if (id_ != NULL && !PyUnicode_CheckExact(id_) && !PyLong_CheckExact(id_))
        goto general;
    data = PyDict_GetItemWithError(value, s_data);
    if (data == NULL) {
        if (PyErr_Occurred())
            goto done;
        data = Py_None;
    }
    status = 1; /* answered, whatever the handler does */
    {
        request = new_request(type_, id_ ? id_ : Py_None, data, connection, &sv->spare);
        if (request == NULL)
            goto failed;
        result = PyObject_CallOneArg(handler, request);
        if (result == NULL)
            goto failed;
    }
    if (!is_plain_result(result)) {
        PyObject *args[4] = {type_, id_ ? id_ : Py_None, data, result};
        if (call_method(connection, s_fast_result, args, 4) < 0)
            status = -1;
        goto done;
    }
    {
        /* Where the reply goes: behind a reply still being computed (a handler in this
         * read went asynchronous), or framed into the batch. */
        PyObject *pending = get_pending(sv);
        if (pending == NULL) {
            status = -1;
            goto done;
        }
        int busy = PyObject_IsTrue(pending);
        Py_DECREF(pending);
        if (busy < 0) {
            status = -1;
            goto done;
        }
        Py_ssize_t room = busy || header != Py_None ? 0 : 4;
        body = encode_reply(type_, id_, result, room);
        if (body == NULL && PyErr_Occurred())
            goto failed;
        if (body == NULL) { /* an id we do not format: encode the dict, as Python does */
            room = 0;
            reply = PyDict_New();
            if (reply == NULL || PyDict_SetItem(reply, s_type, type_) < 0 ||
                PyDict_SetItem(reply, s_id, id_) < 0 || PyDict_SetItem(reply, s_data, result) < 0) {
                status = -1;
                goto done;
            }
            body = PyObject_CallOneArg(json_dumps, reply);
            if (body == NULL)
                goto failed;
            if (!PyBytes_CheckExact(body)) {
                PyErr_SetString(PyExc_TypeError, "the JSON encoder returned no bytes");
                status = -1;
                goto done;
            }
        }
        if (busy) {
            if (call_method(connection, s_emit, &body, 1) < 0)
                status = -1;
            goto done;
        }
        if (room) { /* the int32 header in the room left for it */
            Py_ssize_t size = PyBytes_GET_SIZE(body) - 4;
            if ((uint64_t)size > 0xFFFFFFFFu) {
                PyErr_SetString(PyExc_OverflowError, "a reply longer than 4 GiB cannot be framed");
                status = -1;
                goto done;
            }
            write_be32((unsigned char *)PyBytes_AS_STRING(body), (uint32_t)size);
            if (PyList_Append(batch, body) < 0)
                status = -1;
            goto done;
        }
        PyObject *frame = frame_reply(header, body);
        if (frame == NULL || PyList_Append(batch, frame) < 0)
            status = -1;
        Py_XDECREF(frame);
    }
    goto done;

failed:
    /* `except Exception:` in the Python path: an error frame; anything else propagates. */
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        status = -1;
    }
    else {
        PyObject *args[3] = {type_, id_ ? id_ : Py_None, data};
        if (call_with_handled(connection, s_fast_failed, args, 3) < 0)
            status = -1;
    }
    goto done;

general:
    status = call_method(connection, s_handle_item, &item, 1);
done:
    Py_XDECREF(body);
    Py_XDECREF(reply);
    Py_XDECREF(result);
    release_request(request, &sv->spare);
    Py_XDECREF(handler);
    Py_XDECREF(value);
    return status;
}

PyDoc_STRVAR(serve_doc,
"serve(connection, items, lookup, batch, max_depth, header) -> bodies answered here\n\n"
"The fast path of Connection._deliver for one read's bodies: plain synchronous requests are\n"
"answered into `batch` (framed by `header`, or int32 when it is None); everything else goes\n"
"to the connection's general path, as the Python loop does.");

/* serve()'s loop: the bodies answered here, or -1 with an exception set. */
static Py_ssize_t
serve_items(PyObject *connection, PyObject *items, PyObject *lookup, PyObject *batch,
            PyObject *max_depth, PyObject *header)
{
    Py_ssize_t depth = PyLong_AsSsize_t(max_depth);
    if (depth == -1 && PyErr_Occurred())
        return -1;
    /* Nesting deeper than max_depth takes at least 2 * (max_depth + 1) bytes. */
    Py_ssize_t deep_enough = depth > PY_SSIZE_T_MAX / 2 - 2 ? PY_SSIZE_T_MAX
                             : depth < 0                    ? 0
                                                            : 2 * depth + 2;
    Serving sv = {connection, lookup, batch, max_depth, header, NULL, deep_enough,
                  pending_slot(connection), NULL};
    if (PyCFunction_Check(lookup) && dict_get_function != NULL &&
        PyCFunction_GET_FUNCTION(lookup) == dict_get_function &&
        PyCFunction_GET_SELF(lookup) != NULL && PyDict_CheckExact(PyCFunction_GET_SELF(lookup)))
        sv.handlers = PyCFunction_GET_SELF(lookup); /* held by `lookup` */
    Py_ssize_t answered = 0;
    Py_INCREF(items);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); i++) {
        PyObject *item = PyList_GET_ITEM(items, i);
        Py_INCREF(item);
        int r = serve_one(&sv, item);
        Py_DECREF(item);
        if (r < 0)
            goto failed;
        answered += r;
        if (r == 0) {
            /* The general path may have switched the connection off the fast one (a
             * resumable session started): the rest of this read goes there too. */
            PyObject *on = PyObject_GetAttr(connection, s_fast_path);
            int fast = on == NULL ? -1 : PyObject_IsTrue(on);
            Py_XDECREF(on);
            if (fast < 0)
                goto failed;
            if (!fast) {
                for (i++; i < PyList_GET_SIZE(items); i++) {
                    PyObject *rest = PyList_GET_ITEM(items, i);
                    Py_INCREF(rest);
                    int status = call_method(connection, s_handle_item, &rest, 1);
                    Py_DECREF(rest);
                    if (status < 0)
                        goto failed;
                }
                break;
            }
        }
    }
    Py_DECREF(items);
    Py_XDECREF(sv.spare);
    return answered;
failed:
    Py_DECREF(items);
    Py_XDECREF(sv.spare);
    return -1;
}

static PyObject *
serve(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "serve() takes 6 arguments");
        return NULL;
    }
    if (RequestType == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "serve() before configure()");
        return NULL;
    }
    if (!PyList_CheckExact(args[1]) || !PyList_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "serve() needs lists of items and replies");
        return NULL;
    }
    Py_ssize_t answered = serve_items(args[0], args[1], args[2], args[3], args[4], args[5]);
    return answered < 0 ? NULL : PyLong_FromSsize_t(answered);
}

#ifdef HAVE_READ_EVENT /* POSIX sockets (the epoll reactor is Linux-only anyway) */
/* ------------------------------------------------------------------------------------------ */
/* read_event(): a read event of a LeanServer connection, whole                               */
/* ------------------------------------------------------------------------------------------ */

/* What LeanServer.doRead, ServerProtocol.dataReceived, Connection._deliver, _write_many and
 * write_direct do for the commonest read, in one call: the read holds whole frames, the
 * connection holds nothing unfinished and is on the fast path.  Every other read is handed,
 * as bytes, to the protocol's dataReceived: the Python code stays the one place that
 * decides anything unusual (tests/test_speedups.py compares the two for any reads).
 * configure_reads() says which classes and objects it works with; until then, or when the
 * classes are not what it was written for, read_event() is never called. */

static PyTypeObject *ReadProtocolType = NULL; /* ServerProtocol, exactly (no subclass) */
static PyObject *lean_do_read = NULL;         /* LeanServer.doRead (the function) */
static PyObject *int32_header = NULL;         /* Int32Framing.header */
static PyObject *connection_done = NULL, *connection_lost = NULL;

/* ServerProtocol's slots that read_event() reads or sets, as offsets in the instance. */
enum {
    P_DECODER, P_SNIFF_HEAD, P_BARE_TYPE, P_AUTH, P_HELD, P_FRAME_STARTED, P_AWAITING,
    P_WRITE_PAUSED, P_DIRECT_WRITE, P_FRAMING, P_MAX_DEPTH, P_FACTORY, P_BYTES_IN,
    P_FRAMES_IN, P_FRAMES_OUT, P_BYTES_OUT, P_LAST_SEEN, P_PINGS, P_BATCH, P_SLOTS
};
static const char *slot_names[P_SLOTS] = {
    "_decoder", "_sniff_head", "_bare_type", "_auth", "_held", "frame_started",
    "awaiting_first_frame", "_write_paused", "_direct_write", "_framing", "_max_depth",
    "factory", "bytes_in", "frames_in", "frames_out", "bytes_out", "last_seen",
    "pings_unanswered", "_batch",
};
static Py_ssize_t slot_offsets[P_SLOTS];

static PyObject *s_protocol, *s_socket, *s_fileno, *s_buffer_size, *s_data_received,
    *s_do_read, *s_now, *s_touch, *s_registry, *s_get, *s_config, *s_max_frame_bytes,
    *s_header, *s_write_many, *s_write, *s_temp_data_len, *s_offset, *s_data_buffer,
    *s_disconnecting, *s_connected_attr, *s_tls, *s_write_disconnected, *s_spare_decoder,
    *s_deliver, *s_partial_bytes, *s_limits, *s_max_partial_frame_bytes, *s_written_while_paused;

/* A slot's value (borrowed), or NULL when unset (then the Python code would raise). */
#define SLOT(obj, i) (*(PyObject **)((char *)(obj) + slot_offsets[i]))

static void
set_slot(PyObject *obj, int i, PyObject *value)
{
    PyObject **field = (PyObject **)((char *)obj + slot_offsets[i]);
    Py_INCREF(value);
    Py_XSETREF(*field, value);
}

/* slot += n for an int slot; -1 on error. */
static int
add_to_slot(PyObject *obj, int i, Py_ssize_t n)
{
    PyObject *old = SLOT(obj, i);
    if (old == NULL) {
        PyErr_Format(PyExc_AttributeError, "%s", slot_names[i]);
        return -1;
    }
    PyObject *amount = PyLong_FromSsize_t(n);
    if (amount == NULL)
        return -1;
    PyObject *sum = PyNumber_Add(old, amount);
    Py_DECREF(amount);
    if (sum == NULL)
        return -1;
    Py_XSETREF(*(PyObject **)((char *)obj + slot_offsets[i]), sum);
    return 0;
}

/* An attribute's truth, -1 on error. */
static int
attr_true(PyObject *obj, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL)
        return -1;
    int truth = PyObject_IsTrue(value);
    Py_DECREF(value);
    return truth;
}

/* An attribute as a Py_ssize_t, -1 with an exception on error. */
static Py_ssize_t
attr_size(PyObject *obj, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL)
        return -1;
    Py_ssize_t n = PyLong_AsSsize_t(value);
    Py_DECREF(value);
    return n;
}

/* The socket's descriptor now (-1 once closed), or -2 with an exception. */
static int
socket_fd(PyObject *sock)
{
    PyObject *fd = PyObject_CallMethodNoArgs(sock, s_fileno);
    if (fd == NULL)
        return -2;
    long n = PyLong_AsLong(fd);
    Py_DECREF(fd);
    if (n == -1 && PyErr_Occurred())
        return -2;
    return n < 0 || n > INT32_MAX ? -1 : (int)n;
}

/* Is the protocol between frames, on the fast path, with nothing that changes a read's
 * meaning (sniffing, a decoder holding bytes, seed framing, an auth gate)?  -1: error. */
static int
protocol_is_plain(PyObject *protocol)
{
    for (int i = 0; i < P_SLOTS; i++)
        if (SLOT(protocol, i) == NULL)
            return 0; /* an unset slot: the Python code says what that means */
    if (SLOT(protocol, P_DECODER) != Py_None || SLOT(protocol, P_SNIFF_HEAD) != Py_None ||
        SLOT(protocol, P_BARE_TYPE) != Py_None || SLOT(protocol, P_AUTH) != Py_None)
        return 0;
    PyObject *held = SLOT(protocol, P_HELD);
    if (!PyLong_CheckExact(held) || PyLong_AsSsize_t(held) != 0)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *header = PyObject_GetAttr(SLOT(protocol, P_FRAMING), s_header);
    if (header == NULL)
        return -1;
    int int32 = header == int32_header;
    Py_DECREF(header);
    if (!int32)
        return 0;
    return attr_true(protocol, s_fast_path);
}

/* The number of whole frames `p[0:n]` holds when it is nothing but whole frames of at most
 * `limit` bytes each, else 0 (the decoder decides what anything else means). */
static Py_ssize_t
whole_frames(const unsigned char *p, Py_ssize_t n, Py_ssize_t limit)
{
    Py_ssize_t at = 0, count = 0;
    while (n - at >= 4) {
        uint32_t length = read_be32(p + at);
        if ((Py_ssize_t)length > limit || (Py_ssize_t)length > n - at - 4)
            return 0;
        at += 4 + (Py_ssize_t)length;
        count++;
    }
    return at == n ? count : 0;
}

/* write_direct(transport, data): send now when nothing is queued, queue the rest. */
static int
write_through(PyObject *transport, PyObject *sock, PyObject *data)
{
    int direct = 1;
    Py_ssize_t queued = attr_size(transport, s_temp_data_len);
    if (queued == -1 && PyErr_Occurred())
        return -1;
    if (queued)
        direct = 0;
    if (direct) {
        Py_ssize_t offset = attr_size(transport, s_offset);
        if (offset == -1 && PyErr_Occurred())
            return -1;
        PyObject *buffer = PyObject_GetAttr(transport, s_data_buffer);
        if (buffer == NULL)
            return -1;
        Py_ssize_t held = PyObject_Length(buffer);
        Py_DECREF(buffer);
        if (held < 0)
            return -1;
        direct = offset == held;
    }
    static PyObject **flags[4] = {&s_disconnecting, &s_connected_attr, &s_tls,
                                  &s_write_disconnected};
    for (int i = 0; direct && i < 4; i++) {
        int truth = attr_true(transport, *flags[i]);
        if (truth < 0)
            return -1;
        direct = i == 1 ? truth : !truth; /* connected must be true, the others false */
    }
    Py_ssize_t size = PyBytes_GET_SIZE(data), sent = 0;
    if (direct) {
        int fd = socket_fd(sock);
        if (fd == -2)
            return -1;
        if (fd < 0)
            direct = 0;
        else {
            sent = send(fd, PyBytes_AS_STRING(data), (size_t)size, MSG_NOSIGNAL);
            if (sent < 0) {
                if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                    direct = 0; /* failed: Twisted's own write path reports it */
                sent = 0;
            }
        }
    }
    if (direct && sent == size)
        return 0;
    PyObject *rest = direct && sent ? PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + sent,
                                                                size - sent)
                                    : Py_NewRef(data);
    if (rest == NULL)
        return -1;
    PyObject *r = PyObject_CallMethodOneArg(transport, s_write, rest);
    Py_DECREF(rest);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* b"".join(batch): copied here when every item is bytes, else by bytes.join (which checks
 * the items and says what is wrong), as _write_many joins. */
static PyObject *
join_batch(PyObject *batch)
{
    Py_ssize_t total = 0, count = PyList_GET_SIZE(batch);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(batch, i);
        if (!PyBytes_CheckExact(item) || PyBytes_GET_SIZE(item) > PY_SSIZE_T_MAX - total) {
            PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
            if (empty == NULL)
                return NULL;
            PyObject *joined = PyObject_CallMethod(empty, "join", "O", batch);
            Py_DECREF(empty);
            return joined;
        }
        total += PyBytes_GET_SIZE(item);
    }
    PyObject *data = PyBytes_FromStringAndSize(NULL, total);
    if (data == NULL)
        return NULL;
    char *out = PyBytes_AS_STRING(data);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(batch, i);
        memcpy(out, PyBytes_AS_STRING(item), (size_t)PyBytes_GET_SIZE(item));
        out += PyBytes_GET_SIZE(item);
    }
    return data;
}

/* _deliver() for bodies that all completed in this read (the decoder holds nothing), then
 * _write_many(): 0, or -1 with an exception. */
static int
deliver_whole(PyObject *protocol, PyObject *transport, PyObject *sock, PyObject *items)
{
    PyObject *factory = SLOT(protocol, P_FACTORY);
    Py_INCREF(factory);
    PyObject *batch = NULL, *lookup = NULL, *data = NULL;
    int status = -1;

    PyObject *now = PyObject_CallMethodNoArgs(factory, s_now);
    if (now == NULL)
        goto done;
    set_slot(protocol, P_LAST_SEEN, now);
    Py_DECREF(now);
    PyObject *zero = PyLong_FromLong(0);
    set_slot(protocol, P_PINGS, zero);
    Py_DECREF(zero);
    PyObject *r = PyObject_CallMethodOneArg(factory, s_touch, protocol);
    if (r == NULL)
        goto done;
    Py_DECREF(r);
    if (SLOT(protocol, P_FRAME_STARTED) != NULL && SLOT(protocol, P_FRAME_STARTED) != Py_None)
        set_slot(protocol, P_FRAME_STARTED, Py_None);
    if (SLOT(protocol, P_AWAITING) != NULL) {
        int awaiting = PyObject_IsTrue(SLOT(protocol, P_AWAITING));
        if (awaiting < 0)
            goto done;
        if (awaiting)
            set_slot(protocol, P_AWAITING, Py_False);
    }
    if ((batch = PyList_New(0)) == NULL)
        goto done;
    set_slot(protocol, P_BATCH, batch);
    PyObject *registry = PyObject_GetAttr(factory, s_registry);
    if (registry == NULL)
        goto unbatch;
    lookup = PyObject_GetAttr(registry, s_get);
    Py_DECREF(registry);
    if (lookup == NULL)
        goto unbatch;
    PyObject *max_depth = SLOT(protocol, P_MAX_DEPTH);
    if (max_depth == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_max_depth");
        goto unbatch;
    }
    Py_INCREF(max_depth);
    Py_ssize_t answered = serve_items(protocol, items, lookup, batch, max_depth, Py_None);
    Py_DECREF(max_depth);
    if (answered < 0)
        goto unbatch;
    if (add_to_slot(protocol, P_FRAMES_IN, answered) < 0)
        goto unbatch;
    set_slot(protocol, P_BATCH, Py_None);
    Py_ssize_t frames = PyList_GET_SIZE(batch);
    if (frames == 0) {
        status = 0;
        goto done;
    }
    int paused = SLOT(protocol, P_WRITE_PAUSED) == NULL
                     ? -1
                     : PyObject_IsTrue(SLOT(protocol, P_WRITE_PAUSED));
    int direct = SLOT(protocol, P_DIRECT_WRITE) == NULL
                     ? -1
                     : PyObject_IsTrue(SLOT(protocol, P_DIRECT_WRITE));
    if (paused < 0 || direct < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_AttributeError, "_write_paused");
        goto done;
    }
    if (paused || !direct) { /* backpressure or another transport: the Python write */
        r = PyObject_CallMethodOneArg(protocol, s_write_many, batch);
        if (r == NULL)
            goto done;
        Py_DECREF(r);
        status = 0;
        goto done;
    }
    if (frames == 1 && PyBytes_CheckExact(PyList_GET_ITEM(batch, 0)))
        data = Py_NewRef(PyList_GET_ITEM(batch, 0)); /* (else the join checks and copies) */
    else {
        data = join_batch(batch);
        if (data == NULL)
            goto done;
    }
    if (write_through(transport, sock, data) < 0)
        goto done;
    if (add_to_slot(protocol, P_FRAMES_OUT, frames) < 0 ||
        add_to_slot(protocol, P_BYTES_OUT, PyBytes_GET_SIZE(data)) < 0)
        goto done;
    /* The write itself may have filled the transport's buffer (it paused us): _write_many
     * then counts it in the backlog estimate, and so does this. */
    PyObject *now_paused = SLOT(protocol, P_WRITE_PAUSED);
    if (now_paused != NULL && now_paused != Py_False) {
        int truth = PyObject_IsTrue(now_paused);
        if (truth < 0)
            goto done;
        if (truth) {
            PyObject *old = PyObject_GetAttr(protocol, s_written_while_paused);
            if (old == NULL)
                goto done;
            PyObject *size = PyLong_FromSsize_t(PyBytes_GET_SIZE(data));
            PyObject *sum = size == NULL ? NULL : PyNumber_Add(old, size);
            Py_DECREF(old);
            Py_XDECREF(size);
            if (sum == NULL)
                goto done;
            int set = PyObject_SetAttr(protocol, s_written_while_paused, sum);
            Py_DECREF(sum);
            if (set < 0)
                goto done;
        }
    }
    status = 0;
    goto done;

unbatch:
    set_slot(protocol, P_BATCH, Py_None); /* the Python `finally:` */
done:
    Py_XDECREF(data);
    Py_XDECREF(lookup);
    Py_XDECREF(batch);
    Py_DECREF(factory);
    return status;
}

/* The rest of a large body straight into the decoder's buffer, for a connection whose
 * decoder is gathering one (ServerProtocol.dataReceived's steps for that read, with the
 * read going where the body is kept rather than into a new bytes object gathered later):
 * 1 when it took the read event (*why: None or why the connection is done), 0 when this read
 * is not one for it, -1 on error.  The buffer grows to at most twice the bytes received, as
 * decoder_append grows it, and never past the frame: the next frame is the next read's. */
/* What limits.max_partial_frame_bytes leaves of the factory's partial-byte total (negative
 * when past it), or -1 with an exception. */
static Py_ssize_t
partial_room(PyObject *factory)
{
    Py_ssize_t held = attr_size(factory, s_partial_bytes);
    if (held == -1 && PyErr_Occurred())
        return -1;
    PyObject *config = PyObject_GetAttr(factory, s_config);
    if (config == NULL)
        return -1;
    PyObject *limits = PyObject_GetAttr(config, s_limits);
    Py_DECREF(config);
    if (limits == NULL)
        return -1;
    Py_ssize_t limit = attr_size(limits, s_max_partial_frame_bytes);
    Py_DECREF(limits);
    if (limit == -1 && PyErr_Occurred())
        return -1;
    return limit - held; /* both at least 0 (the config and _deliver keep them so) */
}

static int
read_into_body(PyObject *protocol, int fd, Py_ssize_t read_size, PyObject **why)
{
    PyObject *decoder_obj = SLOT(protocol, P_DECODER);
    if (decoder_obj == NULL || !Py_IS_TYPE(decoder_obj, DecoderType) ||
        SLOT(protocol, P_SNIFF_HEAD) != Py_None || SLOT(protocol, P_FACTORY) == NULL)
        return 0;
    Decoder *d = (Decoder *)decoder_obj;
    if (d->error != Py_None || d->head_have != 4 || d->length < d->large_body || d->length <= 0 ||
        d->have >= d->length)
        return 0;
    int avail = 0;
    if (ioctl(fd, FIONREAD, &avail) < 0 || avail <= 0)
        return 0; /* nothing queued (or the end): the ordinary read says what it means */
    Py_ssize_t want = d->length - d->have;
    if (want > avail)
        want = avail;
    Py_INCREF(decoder_obj);
    PyObject *items = NULL;
    int status = -1;
    if (want > read_size) {
        /* _deliver checks max_partial_frame_bytes after each read, and doRead's reads are
         * at most bufferSize: past what the limit leaves, read no more than doRead would, so
         * a peer gets no further past the limit (nor more memory) than on the Python path. */
        Py_ssize_t room = partial_room(SLOT(protocol, P_FACTORY));
        if (room == -1 && PyErr_Occurred())
            goto done;
        if (want > room)
            want = room > read_size ? room : read_size;
    }
    if (d->body == NULL || d->cap < d->have + want) {
        Py_ssize_t cap = d->have + want;
        cap = cap > d->length / 2 ? d->length : cap * 2; /* <= twice what will be held */
        PyObject *body = PyBytes_FromStringAndSize(NULL, cap);
        if (body == NULL)
            goto done;
        if (d->body != NULL)
            memcpy(PyBytes_AS_STRING(body), PyBytes_AS_STRING(d->body), (size_t)d->have);
        else if (d->chunks != NULL && copy_pieces(d, PyBytes_AS_STRING(body), d->have) < 0) {
            Py_DECREF(body);
            goto done;
        }
        Py_CLEAR(d->chunks);
        Py_XSETREF(d->body, body);
        d->cap = cap;
    }
    Py_ssize_t n = recv(fd, PyBytes_AS_STRING(d->body) + d->have, (size_t)want, 0);
    if (n <= 0) {
        if (n == 0)
            *why = Py_NewRef(connection_done);
        else if (errno == EAGAIN || errno == EWOULDBLOCK)
            *why = Py_NewRef(Py_None);
        else if (errno == EINTR) {
            if (PyErr_CheckSignals() < 0)
                goto done;
            *why = Py_NewRef(Py_None);
        }
        else
            *why = Py_NewRef(connection_lost);
        status = 1;
        goto done;
    }
    /* ServerProtocol.dataReceived from here: count, take a finished body, hand the decoder
     * back as the factory's spare once it holds nothing, deliver. */
    if (add_to_slot(protocol, P_BYTES_IN, n) < 0)
        goto done;
    d->have += n;
    d->buffered = 4 + d->have;
    if ((items = PyList_New(0)) == NULL)
        goto done;
    if (d->have == d->length) {
        PyObject *body = decoder_take(d);
        d->buffered = 0;
        if (body == NULL)
            goto done;
        int r = PyList_Append(items, body);
        Py_DECREF(body);
        if (r < 0)
            goto done;
        set_slot(protocol, P_DECODER, Py_None);
        PyObject *factory = SLOT(protocol, P_FACTORY);
        PyObject *spare = PyObject_GetAttr(factory, s_spare_decoder);
        if (spare == NULL)
            goto done;
        int none = spare == Py_None;
        Py_DECREF(spare);
        if (none && PyObject_SetAttr(factory, s_spare_decoder, decoder_obj) < 0)
            goto done;
    }
    PyObject *held = PyLong_FromSsize_t(d->buffered);
    if (held == NULL)
        goto done;
    PyObject *args[4] = {protocol, items, held, Py_None};
    PyObject *r = PyObject_VectorcallMethod(s_deliver, args, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                            NULL);
    Py_DECREF(held);
    if (r == NULL)
        goto done;
    Py_DECREF(r);
    *why = Py_NewRef(Py_None);
    status = 1;
done:
    Py_XDECREF(items);
    Py_DECREF(decoder_obj);
    return status;
}

PyDoc_STRVAR(read_event_doc,
"read_event(transport) -> None, or why the connection is done\n\n"
"LeanServer.doRead for a read event, with the commonest read (whole frames, a plain\n"
"connection) delivered and answered here; any other read goes to dataReceived as bytes.");

static PyObject *
read_event(PyObject *module, PyObject *transport)
{
    (void)module;
    if (ReadProtocolType == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "read_event() before configure_reads()");
        return NULL;
    }
    /* What `transport.doRead()` would run: an instance may have replaced it (Twisted's
     * abortConnection does, with a no-op), and then that runs. */
    PyObject *do_read = PyObject_GetAttr(transport, s_do_read);
    if (do_read == NULL)
        return NULL;
    if (!PyMethod_Check(do_read) || PyMethod_GET_FUNCTION(do_read) != lean_do_read ||
        PyMethod_GET_SELF(do_read) != transport) {
        PyObject *why = PyObject_CallNoArgs(do_read);
        Py_DECREF(do_read);
        return why;
    }
    Py_DECREF(do_read);
    PyObject *sock = PyObject_GetAttr(transport, s_socket);
    if (sock == NULL)
        return NULL;
    PyObject *protocol = NULL, *data = NULL, *items = NULL, *result = NULL;
    Py_ssize_t size = attr_size(transport, s_buffer_size);
    if (size == -1 && PyErr_Occurred())
        goto done;
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "bufferSize must be positive");
        goto done;
    }
    int fd = socket_fd(sock);
    if (fd == -2)
        goto done;
    if (fd < 0) {
        result = Py_NewRef(connection_lost); /* as recv() on a closed socket fails */
        goto done;
    }
    if ((protocol = PyObject_GetAttr(transport, s_protocol)) == NULL)
        goto done;
    if (Py_IS_TYPE(protocol, ReadProtocolType)) {
        int taken = read_into_body(protocol, fd, size, &result);
        if (taken < 0 || taken == 1)
            goto done;
    }
    if ((data = PyBytes_FromStringAndSize(NULL, size)) == NULL)
        goto done;
    Py_ssize_t n;
    n = recv(fd, PyBytes_AS_STRING(data), (size_t)size, 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            result = Py_NewRef(Py_None);
        else if (errno == EINTR) /* a signal: its handler runs; epoll reports the data again */
            result = PyErr_CheckSignals() < 0 ? NULL : Py_NewRef(Py_None);
        else
            result = Py_NewRef(connection_lost);
        goto done;
    }
    if (n == 0) {
        result = Py_NewRef(connection_done);
        goto done;
    }
    if (n < size && _PyBytes_Resize(&data, n) < 0)
        goto done;
    int plain = Py_IS_TYPE(protocol, ReadProtocolType) ? protocol_is_plain(protocol) : 0;
    if (plain < 0)
        goto done;
    Py_ssize_t frames = 0;
    if (plain) {
        PyObject *factory = SLOT(protocol, P_FACTORY), *config;
        Py_ssize_t limit = -1;
        if ((config = PyObject_GetAttr(factory, s_config)) != NULL) {
            limit = attr_size(config, s_max_frame_bytes);
            Py_DECREF(config);
        }
        if (limit == -1 && PyErr_Occurred())
            goto done;
        frames = whole_frames((const unsigned char *)PyBytes_AS_STRING(data), n, limit);
    }
    if (frames == 0) { /* anything else: dataReceived decides, as LeanServer.doRead does */
        PyObject *r = PyObject_CallMethodOneArg(protocol, s_data_received, data);
        if (r == NULL)
            goto done;
        Py_DECREF(r);
        result = Py_NewRef(Py_None);
        goto done;
    }
    /* ServerProtocol.dataReceived: count the bytes, cut the frames. */
    if (add_to_slot(protocol, P_BYTES_IN, n) < 0)
        goto done;
    if ((items = PyList_New(frames)) == NULL)
        goto done;
    const char *p = PyBytes_AS_STRING(data);
    for (Py_ssize_t i = 0, at = 0; i < frames; i++) {
        Py_ssize_t length = (Py_ssize_t)read_be32((const unsigned char *)p + at);
        PyObject *body = PyBytes_FromStringAndSize(p + at + 4, length);
        if (body == NULL)
            goto done;
        PyList_SET_ITEM(items, i, body);
        at += 4 + length;
    }
    Py_CLEAR(data); /* the read's bytes are not needed any more */
    if (deliver_whole(protocol, transport, sock, items) < 0)
        goto done;
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(items);
    Py_XDECREF(data);
    Py_XDECREF(protocol);
    Py_DECREF(sock);
    return result;
}

PyDoc_STRVAR(configure_reads_doc,
"configure_reads(protocol_class, lean_do_read, int32_header, done, lost) -> bool\n\n"
"What read_event() works with; False (and read_event() must not be used) when\n"
"protocol_class's slots are not the plain ones it reads and writes.");

static PyObject *
configure_reads(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 5 || !PyType_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "configure_reads() takes a class and 4 objects");
        return NULL;
    }
    PyTypeObject *tp = (PyTypeObject *)args[0];
    Py_CLEAR(ReadProtocolType);
    if (tp->tp_getattro != PyObject_GenericGetAttr || tp->tp_setattro != PyObject_GenericSetAttr)
        Py_RETURN_FALSE;
    for (int i = 0; i < P_SLOTS; i++) {
        PyObject *name = PyUnicode_InternFromString(slot_names[i]);
        if (name == NULL)
            return NULL;
        PyObject *descr = _PyType_Lookup(tp, name); /* borrowed */
        Py_DECREF(name);
        if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type))
            Py_RETURN_FALSE;
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type != T_OBJECT_EX || member->offset <= 0 || (member->flags & READONLY))
            Py_RETURN_FALSE;
        slot_offsets[i] = member->offset;
    }
    /* Its writes must be Connection's own (a subclass overriding _write_many says False). */
    PyObject *plain = PyObject_GetAttrString(args[0], "_plain_writes");
    if (plain == NULL)
        return NULL;
    int plain_writes = PyObject_IsTrue(plain);
    Py_DECREF(plain);
    if (plain_writes <= 0)
        return plain_writes < 0 ? NULL : Py_NewRef(Py_False);
    Py_XSETREF(lean_do_read, Py_NewRef(args[1]));
    Py_XSETREF(int32_header, Py_NewRef(args[2]));
    Py_XSETREF(connection_done, Py_NewRef(args[3]));
    Py_XSETREF(connection_lost, Py_NewRef(args[4]));
    Py_INCREF(tp);
    ReadProtocolType = tp;
    Py_RETURN_TRUE;
}
#endif /* HAVE_READ_EVENT */

PyDoc_STRVAR(configure_doc,
"configure(request, loads, dumps, exceeds_depth): what serve() builds and calls.");

static PyObject *
configure(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "configure() takes 4 arguments");
        return NULL;
    }
    for (int i = 0; i < 4; i++) {
        if (!PyCallable_Check(args[i])) {
            PyErr_SetString(PyExc_TypeError, "configure() takes 4 callables");
            return NULL;
        }
    }
    Py_INCREF(args[0]);
    Py_XSETREF(RequestType, args[0]);
    if (reply_prefixes == NULL && (reply_prefixes = PyDict_New()) == NULL)
        return NULL;
    PyDict_Clear(reply_prefixes);
    request_fast = 0;
    if (PyType_Check(args[0])) {
        static const char *names[4] = {"type", "id", "data", "_connection"};
        PyTypeObject *tp = (PyTypeObject *)args[0];
        int fast = tp->tp_new == PyBaseObject_Type.tp_new && tp->tp_dictoffset == 0 &&
                   tp->tp_basicsize == (Py_ssize_t)(sizeof(PyObject) + 4 * sizeof(PyObject *));
        for (int i = 0; fast && i < 4; i++) {
            PyObject *descr = PyDict_GetItemString(tp->tp_dict, names[i]); /* borrowed */
            if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type) ||
                ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX) {
                fast = 0;
                break;
            }
            request_offsets[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
        }
        request_fast = fast;
    }
    Py_INCREF(args[1]);
    Py_XSETREF(json_loads, args[1]);
    Py_INCREF(args[2]);
    Py_XSETREF(json_dumps, args[2]);
    Py_INCREF(args[3]);
    Py_XSETREF(exceeds_depth, args[3]);
    Py_RETURN_NONE;
}

static PyObject *
builds_requests(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyBool_FromLong(request_fast);
}

PyDoc_STRVAR(use_avx2_doc,
"use_avx2(on) -> bool: whether long strings are checked and copied with AVX2 from now on\n\n"
"(False where the CPU lacks it, whatever `on` says). For tests of the SSE2 path.");

static PyObject *
use_avx2(PyObject *module, PyObject *on)
{
    (void)module;
    int want = PyObject_IsTrue(on);
    if (want < 0)
        return NULL;
#ifdef HAVE_AVX2_COPY
    have_avx2 = want && __builtin_cpu_supports("avx2");
    return PyBool_FromLong(have_avx2);
#else
    Py_RETURN_FALSE;
#endif
}

PyDoc_STRVAR(loads_doc,
"loads(body) -> the JSON value of `body` (bytes), parsed as serve() parses it: long plain\n"
"strings lifted out first (heartbeatd/wire/_lift.h), the same value or error as loads alone.");

static PyObject *
loads(PyObject *module, PyObject *body)
{
    (void)module;
    if (json_loads == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "loads() before configure()");
        return NULL;
    }
    if (!PyBytes_CheckExact(body)) {
        PyErr_SetString(PyExc_TypeError, "loads() takes bytes");
        return NULL;
    }
    return lift_loads(body);
}

PyDoc_STRVAR(lift_stats_doc,
"lift_stats() -> (lifted, refused): bodies whose long strings were lifted out, and bodies\n"
"parsed whole after a lift was tried (for tests).");

static PyObject *
lift_stats(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return Py_BuildValue("(KK)", lift_lifted, lift_refused);
}

PyDoc_STRVAR(lift_token_doc,
"lift_token(i) -> str: the token run i is replaced by (secret from peers; for tests that\n"
"play a peer who guessed it).");

static PyObject *
lift_token(PyObject *module, PyObject *index)
{
    (void)module;
    Py_ssize_t i = PyLong_AsSsize_t(index);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    char token[LIFT_TOKEN_LEN];
    lift_write_token(token, (size_t)i);
    return PyUnicode_FromStringAndSize(token, LIFT_TOKEN_LEN);
}

static PyMethodDef module_methods[] = {
    {"loads", (PyCFunction)loads, METH_O, loads_doc},
    {"lift_stats", (PyCFunction)lift_stats, METH_NOARGS, lift_stats_doc},
    {"lift_token", (PyCFunction)lift_token, METH_O, lift_token_doc},
    {"use_avx2", (PyCFunction)use_avx2, METH_O, use_avx2_doc},
    {"serve", (PyCFunction)(void (*)(void))serve, METH_FASTCALL, serve_doc},
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL, configure_doc},
#ifdef HAVE_READ_EVENT
    {"read_event", (PyCFunction)read_event, METH_O, read_event_doc},
    {"configure_reads", (PyCFunction)(void (*)(void))configure_reads, METH_FASTCALL,
     configure_reads_doc},
#endif
    {"builds_requests", (PyCFunction)(void (*)(void))builds_requests, METH_NOARGS,
     "True when serve() fills Request's slots itself (else it calls the class)."},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "heartbeatd.wire._speedups",
    .m_doc = "The int32 decoder and the connection's hot path in C (optional).",
    .m_size = -1,
    .m_methods = module_methods,
};

#define INTERN(var, text)                                                                    \
    do {                                                                                     \
        if ((var = PyUnicode_InternFromString(text)) == NULL)                                \
            return NULL;                                                                     \
    } while (0)

PyMODINIT_FUNC
PyInit__speedups(void)
{
    for (int b = 0; b < 0x20; b++)
        special[b] = 1;
#ifdef HAVE_AVX2_COPY
    have_avx2 = __builtin_cpu_supports("avx2");
#endif
    special['"'] = special['\\'] = special[0x7f] = 1;
    if (lift_init() < 0)
        return NULL;
    INTERN(s_type, "type");
    INTERN(s_id, "id");
    INTERN(s_data, "data");
    INTERN(s_pending, "_pending");
    INTERN(s_emit, "_emit");
    INTERN(s_handle_item, "_handle_item");
    INTERN(s_fast_failed, "_fast_failed");
    INTERN(s_fast_result, "_fast_result");
    INTERN(s_fast_path, "fast_path");
#ifdef HAVE_READ_EVENT
    INTERN(s_protocol, "protocol");
    INTERN(s_socket, "socket");
    INTERN(s_fileno, "fileno");
    INTERN(s_buffer_size, "bufferSize");
    INTERN(s_data_received, "dataReceived");
    INTERN(s_do_read, "doRead");
    INTERN(s_now, "now");
    INTERN(s_touch, "touch");
    INTERN(s_registry, "registry");
    INTERN(s_get, "get");
    INTERN(s_config, "config");
    INTERN(s_max_frame_bytes, "max_frame_bytes");
    INTERN(s_header, "header");
    INTERN(s_write_many, "_write_many");
    INTERN(s_write, "write");
    INTERN(s_temp_data_len, "_tempDataLen");
    INTERN(s_offset, "offset");
    INTERN(s_data_buffer, "dataBuffer");
    INTERN(s_disconnecting, "disconnecting");
    INTERN(s_connected_attr, "connected");
    INTERN(s_tls, "TLS");
    INTERN(s_write_disconnected, "_writeDisconnected");
    INTERN(s_spare_decoder, "spare_decoder");
    INTERN(s_deliver, "_deliver");
    INTERN(s_partial_bytes, "partial_bytes");
    INTERN(s_limits, "limits");
    INTERN(s_max_partial_frame_bytes, "max_partial_frame_bytes");
    INTERN(s_written_while_paused, "_written_while_paused");
#endif
    PyObject *framing = PyImport_ImportModule("heartbeatd.wire.framing");
    if (framing == NULL)
        return NULL;
    FrameTooLarge = PyObject_GetAttrString(framing, "FrameTooLarge");
    Py_DECREF(framing);
    if (FrameTooLarge == NULL)
        return NULL;
    PyObject *probe = PyDict_New();
    PyObject *get = probe == NULL ? NULL : PyObject_GetAttrString(probe, "get");
    Py_XDECREF(probe);
    if (get == NULL)
        return NULL;
    if (PyCFunction_Check(get))
        dict_get_function = PyCFunction_GET_FUNCTION(get);
    Py_DECREF(get);
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    PyObject *decoder = PyType_FromSpec(&decoder_spec);
    if (decoder == NULL) {
        Py_DECREF(module);
        return NULL;
    }
    DecoderType = (PyTypeObject *)decoder; /* the module holds it */
    PyObject *four = PyLong_FromLong(4);
    if (four == NULL || PyObject_SetAttrString(decoder, "prefix_length", four) < 0 ||
        PyModule_AddObject(module, "Int32Decoder", decoder) < 0) {
        Py_XDECREF(four);
        Py_DECREF(decoder);
        Py_DECREF(module);
        return NULL;
    }
    Py_DECREF(four);
    return module;
}
