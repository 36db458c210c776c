/* The hot paths of a ring (transport/cursor.py says which, and why), compiled.
 *
 * A small message costs a round trip two enqueues and two dequeues; in Python each is ~40 bytecodes of word loads
 * and stores (~0.8 us on the development VM, ~2 us on the H200 host), about as much as pickling the message. Here
 * each is one C call. Nothing else changes: the same words, the same protocol (transport/layout.py), the same
 * fences (transport/_sync.py); every case that is not "a small bare pickle, and the ring has room / has news" is
 * refused (False, or the SLOW sentinel) and taken by the Python code, which also owns sleeping, timeouts, errors.
 *
 * Thread safety comes from the GIL: put() and take() never release it and call no Python code while they touch
 * the ring (take() copies the pickle out and releases the slot before it unpickles), so each is atomic against
 * the other threads of this process. The Python slow paths hold the ring's lock and set ``busy`` while they use
 * the cursor; a fast call that finds ``busy`` set refuses. ``closed`` is set before the mapping goes away.
 * spin() releases the GIL: it only reads the ``pub`` and ``closed`` words, holds a reference to the mapping's object,
 * and counts itself in ``spinning``, which Ring._unmap waits to see at 0 (after setting ``closed``) before it unmaps.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <sched.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/futex.h>

#define OFF_CLOSED 28
#define KIND_PICKLED 7u
#define WAKE_ALL 0x7FFFFFFF

static PyObject *EMPTY;  /* take(): nothing published yet */
static PyObject *SLOW;   /* take(): this chunk (or this moment) is the Python code's business */

static inline uint32_t load_acq(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void store_rel(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint32_t *word(char *base, Py_ssize_t off) { return (uint32_t *)(base + off); }

static inline void wake(uint32_t *futex_word) {
    __atomic_fetch_add(futex_word, 1u, __ATOMIC_SEQ_CST);  /* change the word: a waiter about to sleep returns */
    syscall(SYS_futex, futex_word, FUTEX_WAKE, WAKE_ALL, NULL, NULL, 0);
}

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* A sequence of non-negative ints (offsets) into a malloc'ed array of n entries. */
static Py_ssize_t *offsets(PyObject *seq, Py_ssize_t n, const char *what) {
    PyObject *fast = PySequence_Fast(seq, what);
    if (!fast) return NULL;
    if (PySequence_Fast_GET_SIZE(fast) != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd offsets", what, n);
        Py_DECREF(fast);
        return NULL;
    }
    Py_ssize_t *out = PyMem_Malloc(sizeof(Py_ssize_t) * (n ? n : 1));
    if (!out) { Py_DECREF(fast); PyErr_NoMemory(); return NULL; }
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(fast, i));
        if (out[i] < 0) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s: negative offset", what);
            PyMem_Free(out);
            Py_DECREF(fast);
            return NULL;
        }
    }
    Py_DECREF(fast);
    return out;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Writer: publish a bare pickle that fits one slot                                                            */

typedef struct {
    PyObject_HEAD
    char *base;
    Py_ssize_t slot_bytes, nslots, nreaders;
    Py_ssize_t *metas, *datas, *consumed;
    uint32_t *pub, *sleepers, *rwake;
    unsigned long long w, limit;  /* chunks published (unbounded); below limit a chunk may go without looking */
    Py_ssize_t slot;
    int light, always_wake, busy, closed;
} Writer;

static void Writer_dealloc(Writer *self) {
    PyMem_Free(self->metas);
    PyMem_Free(self->datas);
    PyMem_Free(self->consumed);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Writer_init(Writer *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"base", "slot_bytes", "nslots", "metas", "datas", "consumed", "pub", "sleepers",
                            "rwake", "limit", "light", "always_wake", NULL};
    unsigned long long base, limit;
    Py_ssize_t pub, sleepers, rwake;
    PyObject *metas, *datas, *consumed;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KnnOOOnnnKpp", names, &base, &self->slot_bytes, &self->nslots,
                                     &metas, &datas, &consumed, &pub, &sleepers, &rwake, &limit, &self->light,
                                     &self->always_wake))
        return -1;
    if (self->nslots <= 0 || self->slot_bytes <= 0) {
        PyErr_SetString(PyExc_ValueError, "nslots and slot_bytes must be positive");
        return -1;
    }
    self->nreaders = PySequence_Size(consumed);
    if (self->nreaders < 0) return -1;
    PyMem_Free(self->metas); PyMem_Free(self->datas); PyMem_Free(self->consumed);
    self->metas = offsets(metas, self->nslots, "metas");
    self->datas = self->metas ? offsets(datas, self->nslots, "datas") : NULL;
    self->consumed = self->datas ? offsets(consumed, self->nreaders, "consumed") : NULL;
    if (!self->consumed) return -1;
    self->base = (char *)(uintptr_t)base;
    self->pub = word(self->base, pub);
    self->sleepers = word(self->base, sleepers);
    self->rwake = word(self->base, rwake);
    self->w = 0;
    self->limit = limit;
    self->slot = 0;
    self->busy = self->closed = 0;
    return 0;
}

/* The readers' counters bound how far the writer may run ahead. False if some counter is impossible (then the
 * Python path reads them again and raises CorruptMessage). */
static int refresh_limit(Writer *self) {
    uint32_t lag = 0, w32 = (uint32_t)self->w;
    for (Py_ssize_t r = 0; r < self->nreaders; r++) {
        uint32_t d = w32 - load_acq(word(self->base, self->consumed[r]));
        if (d > lag) lag = d;
    }
    if (lag > (uint32_t)self->nslots) return 0;
    self->limit = self->w - lag + (unsigned long long)self->nslots;
    return 1;
}

/* Chunk w's record (its payload is in the current slot), then pub = w + 1, then wake sleeping readers. */
static void publish(Writer *self, uint32_t length, uint32_t kind) {
    Py_ssize_t s = self->slot;
    uint32_t *rec = word(self->base, self->metas[s]);
    rec[0] = (uint32_t)self->w;
    rec[1] = length;
    rec[2] = kind;
    self->w += 1;
    store_rel(self->pub, (uint32_t)self->w);  /* payload and record before pub */
    self->slot = s + 1 < self->nslots ? s + 1 : 0;
    if (!self->light) __atomic_thread_fence(__ATOMIC_SEQ_CST);  /* store(pub) -> load(sleepers): Dekker */
    if (__atomic_load_n(self->sleepers, __ATOMIC_RELAXED) || self->always_wake) wake(self->rwake);
}

static PyObject *Writer_put(Writer *self, PyObject *obj) {
    if (self->busy || self->closed) Py_RETURN_FALSE;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return NULL;
    Py_ssize_t n = view.len;
    if (n > self->slot_bytes || (self->w >= self->limit && (!refresh_limit(self) || self->w >= self->limit))) {
        PyBuffer_Release(&view);
        Py_RETURN_FALSE;  /* too big for one slot, or the ring is full: the Python path frames / waits */
    }
    memcpy(self->base + self->datas[self->slot], view.buf, (size_t)n);
    PyBuffer_Release(&view);
    publish(self, (uint32_t)n, KIND_PICKLED);
    Py_RETURN_TRUE;
}

/* publish(length, kind): the Python paths' publish of the slot they filled (they hold the cursor: busy). */
static PyObject *Writer_publish(Writer *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "publish(length, kind)");
        return NULL;
    }
    Py_ssize_t length = PyLong_AsSsize_t(args[0]);
    long kind = PyLong_AsLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    if (length < 0 || length > self->slot_bytes || kind < 0 || kind > 7) {
        PyErr_Format(PyExc_ValueError, "publish: length %zd or kind %ld out of range", length, kind);
        return NULL;
    }
    publish(self, (uint32_t)length, (uint32_t)kind);
    Py_RETURN_NONE;
}

static PyMethodDef Writer_methods[] = {
    {"put", (PyCFunction)Writer_put, METH_O,
     "put(pickle) -> bool: publish a bare pickle in the next slot; False when it does not fit one slot, the ring "
     "is full, or the Python path holds the cursor (busy) or closed it."},
    {"publish", (PyCFunction)(void (*)(void))Writer_publish, METH_FASTCALL,
     "publish(length, kind): publish the current slot, filled by the caller, who holds the cursor."},
    {NULL}};

static PyMemberDef Writer_members[] = {
    {"w", T_ULONGLONG, offsetof(Writer, w), 0, "chunks published so far (unbounded)"},
    {"limit", T_ULONGLONG, offsetof(Writer, limit), 0, "chunks below this may be written without looking"},
    {"slot", T_PYSSIZET, offsetof(Writer, slot), 0, "the slot the next chunk goes to"},
    {"busy", T_INT, offsetof(Writer, busy), 0, "set while the Python path holds the cursor"},
    {"closed", T_INT, offsetof(Writer, closed), 0, "set once this end is closed (before the mapping goes)"},
    {NULL}};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "transport._ringfast.Writer",
    .tp_basicsize = sizeof(Writer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The writer's cursor and hot path (transport/cursor.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Writer_init,
    .tp_dealloc = (destructor)Writer_dealloc,
    .tp_methods = Writer_methods,
    .tp_members = Writer_members,
};

/* ---------------------------------------------------------------------------------------------------------- */
/* Reader: take a bare pickle out of the next slot                                                             */

typedef struct {
    PyObject_HEAD
    char *base;
    Py_ssize_t slot_bytes, nslots, max_copy;
    Py_ssize_t *metas, *datas;
    uint32_t *pub, *consumed, *writer_sleeping, *wake_target, *wwake, *closed_word;
    PyObject *loads;
    PyObject *owner;  /* the mapping's Python object: kept alive (never unmapped by garbage collection) meanwhile */
    uint32_t c;  /* chunks consumed, mod 2**32 */
    Py_ssize_t slot;
    int light, always_wake, busy, closed;
    int spinning;  /* calls in spin() (GIL released): Ring._unmap waits for 0 before it unmaps */
} Reader;

static void Reader_dealloc(Reader *self) {
    PyMem_Free(self->metas);
    PyMem_Free(self->datas);
    Py_XDECREF(self->loads);
    Py_XDECREF(self->owner);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Reader_init(Reader *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"base", "slot_bytes", "nslots", "metas", "datas", "consumed", "pub", "writer_sleeping",
                            "wake_target", "wwake", "light", "always_wake", "loads", "max_copy", "owner", NULL};
    unsigned long long base;
    Py_ssize_t consumed, pub, writer_sleeping, wake_target, wwake;
    PyObject *metas, *datas, *loads, *owner;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KnnOOnnnnnppOnO", names, &base, &self->slot_bytes, &self->nslots,
                                     &metas, &datas, &consumed, &pub, &writer_sleeping, &wake_target, &wwake,
                                     &self->light, &self->always_wake, &loads, &self->max_copy, &owner))
        return -1;
    if (self->nslots <= 0 || self->slot_bytes <= 0 || !PyCallable_Check(loads)) {
        PyErr_SetString(PyExc_ValueError, "nslots and slot_bytes must be positive, loads callable");
        return -1;
    }
    PyMem_Free(self->metas); PyMem_Free(self->datas);
    self->metas = offsets(metas, self->nslots, "metas");
    self->datas = self->metas ? offsets(datas, self->nslots, "datas") : NULL;
    if (!self->datas) return -1;
    self->base = (char *)(uintptr_t)base;
    self->pub = word(self->base, pub);
    self->consumed = word(self->base, consumed);
    self->writer_sleeping = word(self->base, writer_sleeping);
    self->wake_target = word(self->base, wake_target);
    self->wwake = word(self->base, wwake);
    self->closed_word = word(self->base, OFF_CLOSED);
    Py_INCREF(loads);
    Py_XSETREF(self->loads, loads);
    Py_INCREF(owner);
    Py_XSETREF(self->owner, owner);
    self->c = 0;
    self->slot = 0;
    self->busy = self->closed = self->spinning = 0;
    return 0;
}

static PyObject *Reader_take(Reader *self, PyObject *unused) {
    if (self->busy || self->closed) return Py_NewRef(SLOW);
    uint32_t c = self->c;
    uint32_t pub = load_acq(self->pub);  /* pub before the record and payload */
    if (pub == c) return Py_NewRef(EMPTY);
    if (pub - c > (uint32_t)self->nslots) return Py_NewRef(SLOW);  /* corrupt: the Python path says so */
    Py_ssize_t s = self->slot;
    const uint32_t *rec = word(self->base, self->metas[s]);
    uint32_t seq = rec[0], length = rec[1], kind = rec[2];
    const unsigned char *data = (const unsigned char *)self->base + self->datas[s];
    /* a pickle starts with PROTO and ends with STOP: a corrupt record never feeds pickle a shifted stream */
    if (kind != KIND_PICKLED || seq != c || length < 3 || (Py_ssize_t)length > self->slot_bytes ||
        (Py_ssize_t)length > self->max_copy || data[0] != 0x80 || data[length - 1] != 0x2E)
        return Py_NewRef(SLOW);
    PyObject *copy = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)length);
    if (!copy) return NULL;  /* nothing consumed: the message stays for the next call */
    /* release the slot: our copy is complete before the writer may reuse it */
    c += 1;
    self->c = c;
    self->slot = s + 1 < self->nslots ? s + 1 : 0;
    store_rel(self->consumed, c);
    if (!self->light) __atomic_thread_fence(__ATOMIC_SEQ_CST);  /* store(consumed) -> load(writer_sleeping) */
    if ((__atomic_load_n(self->writer_sleeping, __ATOMIC_RELAXED) &&
         c - __atomic_load_n(self->wake_target, __ATOMIC_RELAXED) < 0x80000000u) || self->always_wake)
        wake(self->wwake);
    PyObject *obj = PyObject_CallOneArg(self->loads, copy);  /* may run Python code: the ring is done with */
    Py_DECREF(copy);
    return obj;
}

/* spin(window_ns, yields, lost_ns) -> 1 news, 0 the window passed, 2 a yield lost the CPU for lost_ns or more
 * (something outside the ring holds the cores: the caller stops spinning for a while), 3 the ring was closed. */
static PyObject *Reader_spin(Reader *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "spin(window_ns, yields, lost_ns)");
        return NULL;
    }
    long long window = PyLong_AsLongLong(args[0]);
    int yields = PyObject_IsTrue(args[1]);
    long long lost = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred() || yields < 0) return NULL;
    if (self->closed) return PyLong_FromLong(3);
    uint32_t c = self->c;
    int result = 0;
    self->spinning += 1;  /* under the GIL, as Ring._unmap reads it: the mapping stays until we are out */
    Py_BEGIN_ALLOW_THREADS
    uint64_t t = now_ns(), end = t + (uint64_t)(window > 0 ? window : 0);
    for (unsigned i = 0;; i++) {
        if (__atomic_load_n(self->pub, __ATOMIC_ACQUIRE) != c) { result = 1; break; }
        if (__atomic_load_n(self->closed_word, __ATOMIC_RELAXED) || __atomic_load_n(&self->closed, __ATOMIC_RELAXED)) {
            result = 3;  /* closed by a party, or this end closed by another thread of ours */
            break;
        }
        if (yields) {
            sched_yield();
            uint64_t now = now_ns();
            if (lost > 0 && now - t >= (uint64_t)lost) {
                result = __atomic_load_n(self->pub, __ATOMIC_ACQUIRE) != c ? 1 : 2;
                break;
            }
            if (now >= end) break;
            t = now;
        } else {
            cpu_relax();
            if ((i & 63) == 63 && now_ns() >= end) break;
        }
    }
    Py_END_ALLOW_THREADS
    self->spinning -= 1;
    return PyLong_FromLong(result);
}

static PyMethodDef Reader_methods[] = {
    {"take", (PyCFunction)Reader_take, METH_NOARGS,
     "take() -> the next message if it is a bare pickle of at most max_copy bytes (copied out, slot released, then "
     "unpickled); EMPTY when nothing is published; SLOW for anything the Python path must handle."},
    {"spin", (PyCFunction)(void (*)(void))Reader_spin, METH_FASTCALL,
     "spin(window_ns, yields, lost_ns) -> 1 news, 0 window passed, 2 a yield lost the CPU, 3 closed. GIL released."},
    {NULL}};

static PyMemberDef Reader_members[] = {
    {"c", T_UINT, offsetof(Reader, c), 0, "chunks consumed, mod 2**32"},
    {"slot", T_PYSSIZET, offsetof(Reader, slot), 0, "the slot of the next chunk"},
    {"busy", T_INT, offsetof(Reader, busy), 0, "set while the Python path holds the cursor"},
    {"closed", T_INT, offsetof(Reader, closed), 0, "set once this end is closed (before the mapping goes)"},
    {"spinning", T_INT, offsetof(Reader, spinning), READONLY, "calls inside spin(), which run without the GIL"},
    {NULL}};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "transport._ringfast.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A reader's cursor and hot path (transport/cursor.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Reader_init,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_methods = Reader_methods,
    .tp_members = Reader_members,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "transport._ringfast",
                                    "Compiled hot paths of the shared-memory ring (transport/cursor.py).", -1, NULL};

PyMODINIT_FUNC PyInit__ringfast(void) {
    if (PyType_Ready(&WriterType) < 0 || PyType_Ready(&ReaderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    EMPTY = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    SLOW = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    if (!EMPTY || !SLOW || PyModule_AddObjectRef(m, "EMPTY", EMPTY) < 0 ||
        PyModule_AddObjectRef(m, "SLOW", SLOW) < 0 ||
        PyModule_AddObjectRef(m, "Writer", (PyObject *)&WriterType) < 0 ||
        PyModule_AddObjectRef(m, "Reader", (PyObject *)&ReaderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
