/* kvtransfer._C: the CPython binding of the C core. Thin on purpose: argument
 * conversion, the GIL released around anything that waits, and errors turned into
 * kvtransfer.errors exceptions (errno, failing call, message). The typed facade is
 * kvtransfer/engine.py. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvt.h"

static PyObject *raise_err(const kvt_err *e, long long entry)
{
    PyObject *mod = PyImport_ImportModule("kvtransfer.errors");
    if (!mod)
        return NULL;
    PyObject *exc = PyObject_CallMethod(mod, "from_c", "issL", -e->code, e->op, e->msg, entry);
    Py_DECREF(mod);
    if (exc) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* ---------------------------------------------------------------- Transfer */

typedef struct {
    PyObject_HEAD
    kvt_transfer *t;
} TransferObject;

static void Transfer_dealloc(TransferObject *self)
{
    if (self->t)
        kvt_transfer_release(self->t);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* wait(timeout_s: float | None) -> bool: True when finished. */
static PyObject *Transfer_wait(TransferObject *self, PyObject *arg)
{
    int64_t ms = -1;
    if (arg != Py_None) {
        double s = PyFloat_AsDouble(arg);
        if (s == -1.0 && PyErr_Occurred())
            return NULL;
        ms = s <= 0 ? 0 : (int64_t)(s * 1000.0 + 0.5);
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kvt_transfer_wait(self->t, ms);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(rc == 0);
}

/* status() -> None while running; raises the transfer's error if it failed; True if ok. */
static PyObject *Transfer_status(TransferObject *self, PyObject *noargs)
{
    kvt_err e;
    int64_t entry = -1;
    int st = kvt_transfer_status(self->t, &e, &entry);
    if (st == 1)
        Py_RETURN_NONE;
    if (st < 0)
        return raise_err(&e, entry);
    Py_RETURN_TRUE;
}

static PyObject *Transfer_set_notify_fd(TransferObject *self, PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    kvt_transfer_set_notify_fd(self->t, (int)fd);
    Py_RETURN_NONE;
}

static PyMethodDef Transfer_methods[] = {
    {"wait", (PyCFunction)Transfer_wait, METH_O, "wait(timeout_s or None) -> bool finished"},
    {"status", (PyCFunction)Transfer_status, METH_NOARGS, "None running, True ok; raises if failed"},
    {"set_notify_fd", (PyCFunction)Transfer_set_notify_fd, METH_O, "eventfd written on completion"},
    {NULL}};

static PyTypeObject TransferType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvtransfer._C.Transfer",
    .tp_basicsize = sizeof(TransferObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Transfer_dealloc,
    .tp_methods = Transfer_methods,
};

/* -------------------------------------------------------------------- Peer */

typedef struct {
    PyObject_HEAD
    kvt_peer *p;
    PyObject *engine; /* keeps the engine alive while the peer is */
} PeerObject;

static void Peer_close_impl(PeerObject *self)
{
    if (self->p) {
        kvt_peer *p = self->p;
        self->p = NULL;
        Py_BEGIN_ALLOW_THREADS
        kvt_peer_close(p);
        Py_END_ALLOW_THREADS
    }
}

static void Peer_dealloc(PeerObject *self)
{
    Peer_close_impl(self);
    Py_XDECREF(self->engine);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Peer_close(PeerObject *self, PyObject *noargs)
{
    Peer_close_impl(self);
    Py_RETURN_NONE;
}

/* read(reqs: buffer of packed kvt_read_req) -> Transfer */
static PyObject *Peer_read(PeerObject *self, PyObject *arg)
{
    if (!self->p) {
        kvt_err e;
        kvt_error(&e, EBADF, "read", "peer is closed");
        return raise_err(&e, -1);
    }
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (b.len % sizeof(kvt_read_req) != 0) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "request buffer is not a whole number of kvt_read_req entries");
        return NULL;
    }
    kvt_err e;
    kvt_transfer *t = NULL;
    int rc;
    size_t n = (size_t)b.len / sizeof(kvt_read_req);
    Py_BEGIN_ALLOW_THREADS
    rc = kvt_peer_read(self->p, (const kvt_read_req *)b.buf, n, &t, &e);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    if (rc < 0)
        return raise_err(&e, -1);
    TransferObject *to = PyObject_New(TransferObject, &TransferType);
    if (!to) {
        kvt_transfer_wait(t, -1);
        kvt_transfer_release(t);
        return NULL;
    }
    to->t = t;
    return (PyObject *)to;
}

/* One column of read_cols: an int (the same for every entry) or a 1-D buffer of n
 * 8-byte integers with any stride that is a multiple of 8 (broadcast views: 0). */
static int get_col(PyObject *o, Py_ssize_t n, const char *name, Py_buffer *b, uint64_t *scalar, kvt_col *c)
{
    if (PyLong_Check(o)) {
        *scalar = PyLong_AsUnsignedLongLongMask(o);
        if (PyErr_Occurred())
            return -1;
        c->p = scalar;
        c->stride = 0;
        return 0;
    }
    if (PyObject_GetBuffer(o, b, PyBUF_STRIDES | PyBUF_FORMAT) < 0)
        return -1;
    const char *f = b->format ? b->format : "B";
    char last = f[strlen(f) - 1];
    if (b->ndim != 1 || b->itemsize != 8 || !strchr("qQlL", last) || b->shape[0] != n ||
        b->strides[0] % 8 != 0) {
        PyBuffer_Release(b);
        b->obj = NULL;
        PyErr_Format(PyExc_ValueError, "read_cols: %s must be an int or a 1-D array of %zd 64-bit integers", name, n);
        return -1;
    }
    c->p = (const uint64_t *)b->buf;
    c->stride = b->strides[0] < 0 ? 0 : (size_t)(b->strides[0] / 8);
    if (b->strides[0] < 0) {
        PyBuffer_Release(b);
        b->obj = NULL;
        PyErr_Format(PyExc_ValueError, "read_cols: %s has a negative stride", name);
        return -1;
    }
    return 0;
}

/* read_cols / read_paged(n, local_region, local_off, remote_region, remote_key,
 * remote_addr, remote_off, len) -> Transfer; each column an int or an array (see
 * get_col); paged: the regions, key and address are ints (one for every block). */
static PyObject *read_columns(PeerObject *self, PyObject *args, int paged)
{
    Py_ssize_t n;
    PyObject *o[7];
    static const char *names[7] = {"local_region", "local_off", "remote_region", "remote_key",
                                   "remote_addr", "remote_off", "len"};
    if (!PyArg_ParseTuple(args, "nOOOOOOO", &n, &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6]))
        return NULL;
    if (!self->p) {
        kvt_err e;
        kvt_error(&e, EBADF, "read", "peer is closed");
        return raise_err(&e, -1);
    }
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "read_cols: n must be >= 0");
        return NULL;
    }
    Py_buffer bufs[7];
    uint64_t scalars[7];
    kvt_col cols[7];
    int got = 0;
    for (; got < 7; got++) {
        bufs[got].obj = NULL;
        if (get_col(o[got], n, names[got], &bufs[got], &scalars[got], &cols[got]) < 0)
            break;
    }
    PyObject *ret = NULL;
    int ok = got == 7;
    if (ok && paged && (cols[0].stride || cols[2].stride || cols[3].stride || cols[4].stride)) {
        PyErr_SetString(PyExc_ValueError, "read_paged: local_region, remote_region, remote_key and remote_addr "
                                          "must be one for every block");
        ok = 0;
    }
    if (ok) {
        kvt_read_cols rc = {.n = (size_t)n, .local_region = cols[0], .local_off = cols[1], .remote_region = cols[2],
                            .remote_key = cols[3], .remote_addr = cols[4], .remote_off = cols[5], .len = cols[6]};
        kvt_paged_batch pb = {.n = (size_t)n, .local_region = cols[0].p[0], .remote_region = cols[2].p[0],
                              .remote_key = cols[3].p[0], .remote_addr = cols[4].p[0], .local_off = cols[1],
                              .remote_off = cols[5], .len = cols[6]};
        kvt_err e;
        kvt_transfer *t = NULL;
        int r;
        Py_BEGIN_ALLOW_THREADS
        r = paged ? kvt_peer_read_paged(self->p, &pb, &t, &e) : kvt_peer_read_cols(self->p, &rc, &t, &e);
        Py_END_ALLOW_THREADS
        if (r < 0) {
            raise_err(&e, -1);
        } else {
            TransferObject *to = PyObject_New(TransferObject, &TransferType);
            if (!to) {
                kvt_transfer_wait(t, -1);
                kvt_transfer_release(t);
            } else {
                to->t = t;
                ret = (PyObject *)to;
            }
        }
    }
    for (int i = 0; i < got && i < 7; i++)
        if (bufs[i].obj)
            PyBuffer_Release(&bufs[i]);
    return ret;
}

static PyObject *Peer_read_cols(PeerObject *self, PyObject *args) { return read_columns(self, args, 0); }

static PyObject *Peer_read_paged(PeerObject *self, PyObject *args) { return read_columns(self, args, 1); }

static PyObject *Peer_transport(PeerObject *self, void *closure)
{
    if (!self->p)
        Py_RETURN_NONE;
    return PyUnicode_FromString(kvt_peer_transport(self->p));
}

static PyMethodDef Peer_methods[] = {
    {"read", (PyCFunction)Peer_read, METH_O, "read(packed requests) -> Transfer"},
    {"read_cols", (PyCFunction)Peer_read_cols, METH_VARARGS,
     "read_cols(n, local_region, local_off, remote_region, remote_key, remote_addr, remote_off, len) -> Transfer: "
     "a list of entries, each column an int (every entry) or an array"},
    {"read_paged", (PyCFunction)Peer_read_paged, METH_VARARGS,
     "read_paged(n, local_region, local_off, remote_region, remote_key, remote_addr, remote_off, len) -> Transfer: "
     "a paged batch, blocks between one local and one remote region (the regions, key and address ints)"},
    {"close", (PyCFunction)Peer_close, METH_NOARGS, "close the peer; queued reads fail"},
    {NULL}};

static PyGetSetDef Peer_getset[] = {{"transport", (getter)Peer_transport, NULL, "the transport's name (_C.TRANSPORTS)", NULL}, {NULL}};

static PyTypeObject PeerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvtransfer._C.Peer",
    .tp_basicsize = sizeof(PeerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Peer_dealloc,
    .tp_methods = Peer_methods,
    .tp_getset = Peer_getset,
};

/* ------------------------------------------------------------------ Engine */

typedef struct {
    PyObject_HEAD
    kvt_engine *e;
} EngineObject;

static int Engine_init(EngineObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"listen_host", "listen_port", "io_timeout_ms", "tcp_conns", "shm_threads",
                             "verbs_qps", "use_verbs", NULL};
    kvt_engine_opts o = {.use_verbs = 1};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|siiiiip", kwlist, &o.listen_host, &o.listen_port,
                                     &o.io_timeout_ms, &o.tcp_conns, &o.shm_threads, &o.verbs_qps, &o.use_verbs))
        return -1;
    if (self->e) {
        PyErr_SetString(PyExc_RuntimeError, "engine already initialized");
        return -1;
    }
    kvt_err e;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kvt_engine_create(&o, &self->e, &e);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        raise_err(&e, -1);
        return -1;
    }
    return 0;
}

static void Engine_close_impl(EngineObject *self)
{
    if (self->e) {
        kvt_engine *e = self->e;
        self->e = NULL;
        Py_BEGIN_ALLOW_THREADS
        kvt_engine_destroy(e);
        Py_END_ALLOW_THREADS
    }
}

static void Engine_dealloc(EngineObject *self)
{
    Engine_close_impl(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check_open(EngineObject *self)
{
    if (self->e)
        return 1;
    kvt_err e;
    kvt_error(&e, EBADF, "engine", "engine is closed");
    raise_err(&e, -1);
    return 0;
}

static PyObject *Engine_close(EngineObject *self, PyObject *noargs)
{
    Engine_close_impl(self);
    Py_RETURN_NONE;
}

static PyObject *Engine_info(EngineObject *self, PyObject *noargs)
{
    if (!check_open(self))
        return NULL;
    kvt_engine_info in;
    kvt_engine_info_get(self->e, &in);
    return Py_BuildValue("{s:y#,s:i,s:K,s:s,s:i,s:K,s:s,s:i,s:O,s:s,s:i,s:i,s:y#,s:s}", "engine_id",
                         (const char *)in.id, (Py_ssize_t)sizeof in.id, "pid", in.pid, "pidns",
                         (unsigned long long)in.pidns, "boot_id", in.boot_id, "table_fd", in.table_fd,
                         "table_addr", (unsigned long long)in.table_addr, "tcp_host", in.tcp_host,
                         "tcp_port", in.tcp_port, "verbs", in.verbs ? Py_True : Py_False, "ib_device",
                         in.ib_device, "ib_port", in.ib_port, "gid_index", in.gid_index, "gid",
                         (const char *)in.gid, (Py_ssize_t)(in.verbs ? 16 : 0), "verbs_why", in.verbs_why);
}

/* register(addr, nbytes, mem_kind, device) -> (region_id, key, verbs_path) */
static PyObject *Engine_register(EngineObject *self, PyObject *args)
{
    unsigned long long addr, len;
    int kind, dev;
    if (!PyArg_ParseTuple(args, "KKii", &addr, &len, &kind, &dev) || !check_open(self))
        return NULL;
    uint64_t id, key;
    const char *path = "";
    kvt_err e;
    if (kvt_register(self->e, addr, len, kind, dev, &id, &key, &path, &e) < 0)
        return raise_err(&e, -1);
    return Py_BuildValue("KKs", (unsigned long long)id, (unsigned long long)key, path);
}

/* region_cuda(region_id) -> dict: the allocation, device and IPC state of a CUDA region */
static PyObject *Engine_region_cuda(EngineObject *self, PyObject *arg)
{
    unsigned long long id = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred() || !check_open(self))
        return NULL;
    kvt_cuda_alloc a;
    kvt_err e;
    if (kvt_region_cuda(self->e, id, &a, &e) < 0)
        return raise_err(&e, -1);
    return Py_BuildValue("{s:K,s:K,s:i,s:s,s:i}", "alloc_base", (unsigned long long)a.base, "alloc_nbytes",
                         (unsigned long long)a.size, "device", a.device, "pci_bus_id", a.pci_bus_id, "ipc_status",
                         a.ipc_status);
}

static PyObject *Engine_deregister(EngineObject *self, PyObject *arg)
{
    unsigned long long id = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred() || !check_open(self))
        return NULL;
    kvt_err e;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kvt_deregister(self->e, id, &e);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return raise_err(&e, -1);
    Py_RETURN_NONE;
}

/* Attribute `name` of d: bytes (at most cap, exactly cap when exact), text, or an integer. */
static int attr_bytes(PyObject *d, const char *name, void *dst, size_t cap, int exact)
{
    PyObject *v = PyObject_GetAttrString(d, name);
    char *b;
    Py_ssize_t n;
    int rc = v ? PyBytes_AsStringAndSize(v, &b, &n) : -1;
    if (rc == 0 && (n > (Py_ssize_t)cap || (exact && n != (Py_ssize_t)cap))) {
        PyErr_Format(PyExc_ValueError, "descriptor: %s is %zd bytes, not %zu", name, n, cap);
        rc = -1;
    }
    if (rc == 0)
        memcpy(dst, b, (size_t)n);
    Py_XDECREF(v);
    return rc;
}

static int attr_str(PyObject *d, const char *name, char *dst, size_t cap)
{
    PyObject *v = PyObject_GetAttrString(d, name);
    const char *s = v ? PyUnicode_AsUTF8(v) : NULL;
    if (s)
        snprintf(dst, cap, "%s", s);
    Py_XDECREF(v);
    return s ? 0 : -1;
}

static int attr_int(PyObject *d, const char *name, unsigned long long *out)
{
    PyObject *v = PyObject_GetAttrString(d, name);
    *out = v ? PyLong_AsUnsignedLongLongMask(v) : 0;
    Py_XDECREF(v);
    return PyErr_Occurred() ? -1 : 0;
}

/* An EngineDescriptor (any object with its attributes) -> kvt_engine_info. */
static int info_from(PyObject *d, kvt_engine_info *in)
{
    memset(in, 0, sizeof *in);
    unsigned long long pid, pidns, fd, addr, port;
    if (attr_bytes(d, "engine_id", in->id, sizeof in->id, 1) < 0 || attr_bytes(d, "gid", in->gid, sizeof in->gid, 0) < 0 ||
        attr_str(d, "boot_id", in->boot_id, sizeof in->boot_id) < 0 ||
        attr_str(d, "tcp_host", in->tcp_host, sizeof in->tcp_host) < 0 ||
        attr_str(d, "ib_device", in->ib_device, sizeof in->ib_device) < 0 || attr_int(d, "pid", &pid) < 0 ||
        attr_int(d, "pidns", &pidns) < 0 || attr_int(d, "table_fd", &fd) < 0 || attr_int(d, "table_addr", &addr) < 0 ||
        attr_int(d, "tcp_port", &port) < 0)
        return -1;
    in->pid = (int32_t)pid;
    in->pidns = (uint64_t)pidns;
    in->table_fd = (int32_t)fd;
    in->table_addr = (uint64_t)addr;
    in->tcp_port = (int32_t)port;
    PyObject *v = PyObject_GetAttrString(d, "verbs");
    in->verbs = v ? PyObject_IsTrue(v) : -1;
    Py_XDECREF(v);
    return in->verbs < 0 ? -1 : 0;
}

static PyObject *reach_tuple(const kvt_reach *r)
{
    return Py_BuildValue("(sOis)", r->name, r->ok ? Py_True : Py_False, r->code, r->why);
}

static PyObject *reach_list(const kvt_reach *r, size_t n)
{
    PyObject *l = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; l && i < n; i++) {
        PyObject *t = reach_tuple(&r[i]);
        if (!t) {
            Py_CLEAR(l);
            break;
        }
        PyList_SET_ITEM(l, (Py_ssize_t)i, t);
    }
    return l;
}

/* plan(descriptor, forced or None) -> [(name, ok, errno, why), ...] in the order connect tries them */
static PyObject *Engine_plan(EngineObject *self, PyObject *args)
{
    PyObject *d;
    const char *forced = NULL;
    kvt_engine_info in;
    if (!PyArg_ParseTuple(args, "Oz", &d, &forced) || !check_open(self) || info_from(d, &in) < 0)
        return NULL;
    kvt_reach r[KVT_MAX_TRANSPORTS];
    kvt_err e;
    int n = kvt_plan(self->e, &in, forced, r, &e);
    if (n < 0)
        return raise_err(&e, -1);
    return reach_list(r, (size_t)n);
}

/* connect(descriptor, forced or None[, token]) -> (Peer, [(name, False, errno, error), ...] tried and
 * failed first); the token (32 bytes) goes in the tcp hello, for servers that require one */
static PyObject *Engine_connect(EngineObject *self, PyObject *args)
{
    PyObject *d;
    const char *forced = NULL, *token = NULL;
    Py_ssize_t toklen = 0;
    kvt_engine_info in;
    if (!PyArg_ParseTuple(args, "Oz|z#", &d, &forced, &token, &toklen) || !check_open(self) || info_from(d, &in) < 0)
        return NULL;
    if (token && toklen != KVT_TOKEN_LEN) {
        PyErr_SetString(PyExc_ValueError, "a token is 32 bytes");
        return NULL;
    }
    if (token) {
        in.has_token = 1;
        memcpy(in.token, token, KVT_TOKEN_LEN);
    }
    kvt_err e;
    kvt_peer *p = NULL;
    kvt_reach tried[KVT_MAX_TRANSPORTS];
    size_t ntried = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kvt_connect(self->e, &in, forced, &p, tried, &ntried, &e);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return raise_err(&e, -1);
    PyObject *l = reach_list(tried, ntried);
    PeerObject *po = l ? PyObject_New(PeerObject, &PeerType) : NULL;
    if (!po) {
        Py_XDECREF(l);
        kvt_peer_close(p);
        return NULL;
    }
    po->p = p;
    Py_INCREF(self);
    po->engine = (PyObject *)self;
    return Py_BuildValue("(NN)", (PyObject *)po, l);
}

/* transports() -> [(name, offered, why_not, {fact: value}), ...] in preference order */
static PyObject *Engine_transports(EngineObject *self, PyObject *noargs)
{
    if (!check_open(self))
        return NULL;
    size_t n = kvt_transport_count();
    PyObject *l = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; l && i < n; i++) {
        kvt_fact f[KVT_MAX_FACTS];
        size_t nf = 0;
        char why[600];
        int offered = kvt_transport_facts(self->e, i, f, &nf, why, sizeof why);
        PyObject *facts = PyDict_New();
        for (size_t k = 0; facts && k < nf; k++) {
            PyObject *v = f[k].is_int ? PyLong_FromLongLong(f[k].i) : PyUnicode_FromString(f[k].s);
            if (!v || PyDict_SetItemString(facts, f[k].key, v) < 0)
                Py_CLEAR(facts);
            Py_XDECREF(v);
        }
        PyObject *t = facts ? Py_BuildValue("(sOzN)", kvt_transport_name(i), offered ? Py_True : Py_False,
                                            offered ? NULL : why, facts)
                            : NULL;
        if (!t) {
            Py_CLEAR(l);
            break;
        }
        PyList_SET_ITEM(l, (Py_ssize_t)i, t);
    }
    return l;
}

/* set_tcp_limits(idle_ms, max_conns, max_conns_per_peer, max_frame_bytes): 0 keeps a value */
static PyObject *Engine_set_tcp_limits(EngineObject *self, PyObject *args)
{
    kvt_tcp_limits l = {0};
    unsigned long long frame;
    if (!PyArg_ParseTuple(args, "iiiK", &l.idle_timeout_ms, &l.max_conns, &l.max_conns_per_peer, &frame) ||
        !check_open(self))
        return NULL;
    l.max_frame_bytes = frame;
    kvt_err e;
    if (kvt_engine_set_tcp_limits(self->e, &l, &e) < 0)
        return raise_err(&e, -1);
    kvt_engine_tcp_limits(self->e, &l);
    return Py_BuildValue("{s:i,s:i,s:i,s:K}", "idle_timeout_ms", l.idle_timeout_ms, "max_conns", l.max_conns,
                         "max_conns_per_peer", l.max_conns_per_peer, "max_frame_bytes",
                         (unsigned long long)l.max_frame_bytes);
}

static PyObject *Engine_tcp_stats(EngineObject *self, PyObject *noargs)
{
    if (!check_open(self))
        return NULL;
    kvt_tcp_stats t;
    kvt_engine_tcp_stats(self->e, &t);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "connections", t.conns, "threads",
                         t.threads, "accepted", t.accepted, "refused_busy", t.refused_busy, "refused_token",
                         t.refused_token, "dropped_idle", t.dropped_idle, "dropped_deadline", t.dropped_deadline,
                         "dropped_revoked", t.dropped_revoked, "refused_frames", t.refused_frames,
                         "accept_backoffs", t.accept_backoffs);
}

static PyObject *Engine_require_tokens(EngineObject *self, PyObject *noargs)
{
    if (!check_open(self))
        return NULL;
    kvt_engine_require_tokens(self->e);
    Py_RETURN_NONE;
}

/* allow_token(token: 32 bytes, ttl_ms: int, < 0 for none) */
static PyObject *Engine_allow_token(EngineObject *self, PyObject *args)
{
    const char *t;
    Py_ssize_t n;
    long long ttl_ms;
    if (!PyArg_ParseTuple(args, "y#L", &t, &n, &ttl_ms) || !check_open(self))
        return NULL;
    if (n != KVT_TOKEN_LEN) {
        PyErr_SetString(PyExc_ValueError, "a token is 32 bytes");
        return NULL;
    }
    kvt_err e;
    if (kvt_engine_allow_token(self->e, (const uint8_t *)t, ttl_ms, &e) < 0)
        return raise_err(&e, -1);
    Py_RETURN_NONE;
}

/* revoke_token(token) -> connections dropped */
static PyObject *Engine_revoke_token(EngineObject *self, PyObject *args)
{
    const char *t;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y#", &t, &n) || !check_open(self))
        return NULL;
    if (n != KVT_TOKEN_LEN) {
        PyErr_SetString(PyExc_ValueError, "a token is 32 bytes");
        return NULL;
    }
    return PyLong_FromLong(kvt_engine_revoke_token(self->e, (const uint8_t *)t));
}

static PyMethodDef Engine_methods[] = {
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "stop serving and free the engine"},
    {"info", (PyCFunction)Engine_info, METH_NOARGS, "what a peer needs to reach this engine"},
    {"register", (PyCFunction)Engine_register, METH_VARARGS, "register(addr, nbytes, kind, device)"},
    {"deregister", (PyCFunction)Engine_deregister, METH_O, "deregister(region_id)"},
    {"region_cuda", (PyCFunction)Engine_region_cuda, METH_O, "region_cuda(region_id) -> dict of its CUDA allocation"},
    {"connect", (PyCFunction)Engine_connect, METH_VARARGS,
     "connect(descriptor, forced or None[, token]) -> (Peer, [(name, ok, errno, error) of transports that failed "
     "first])"},
    {"plan", (PyCFunction)Engine_plan, METH_VARARGS,
     "plan(descriptor, forced or None) -> [(name, ok, errno, why), ...] in the order connect tries them"},
    {"transports", (PyCFunction)Engine_transports, METH_NOARGS,
     "transports() -> [(name, offered, why not, {fact: value}), ...] in preference order"},
    {"set_tcp_limits", (PyCFunction)Engine_set_tcp_limits, METH_VARARGS, "tcp server limits (0 keeps) -> dict"},
    {"tcp_stats", (PyCFunction)Engine_tcp_stats, METH_NOARGS, "tcp server connections, threads, refusals"},
    {"require_tokens", (PyCFunction)Engine_require_tokens, METH_NOARGS, "tcp server: admit allowed tokens only"},
    {"allow_token", (PyCFunction)Engine_allow_token, METH_VARARGS, "allow_token(token, ttl_ms or -1)"},
    {"revoke_token", (PyCFunction)Engine_revoke_token, METH_VARARGS, "revoke_token(token) -> connections dropped"},
    {NULL}};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvtransfer._C.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

/* ----------------------------------------------------------------- module */

static PyObject *mod_cuda_pointer_device(PyObject *m, PyObject *arg)
{
    unsigned long long ptr = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    int ordinal = -1;
    kvt_err e;
    if (kvt_cuda_pointer_device(ptr, &ordinal, &e) < 0)
        return raise_err(&e, -1);
    return PyLong_FromLong(ordinal);
}

static PyObject *rdma_port_dict(const kvt_rdma_port *p)
{
    PyObject *gids = PyList_New(0);
    for (int g = 0; gids && g < p->ngids; g++) {
        PyObject *x = Py_BuildValue("{s:i,s:y#,s:O}", "index", p->gids[g].index, "raw", (const char *)p->gids[g].raw,
                                    (Py_ssize_t)16, "rocev2", p->gids[g].rocev2 ? Py_True : Py_False);
        if (!x || PyList_Append(gids, x) < 0)
            Py_CLEAR(gids);
        Py_XDECREF(x);
    }
    if (!gids)
        return NULL;
    return Py_BuildValue("{s:i,s:s,s:s,s:i,s:I,s:I,s:I,s:N}", "port", p->port, "state", p->state, "link_layer",
                         p->link_layer, "active_mtu", p->active_mtu, "lid", p->lid, "width_code", p->width_code,
                         "speed_code", p->speed_code, "gids", gids);
}

/* verbs_devices() -> [{name, fw, max_qp_wr, ..., ports: [{port, state, ..., gids: [...]}]} or {name, error}] */
static PyObject *mod_verbs_devices(PyObject *m, PyObject *noargs)
{
    kvt_rdma_device *devs = calloc(KVT_RDMA_MAX_DEVICES, sizeof *devs);
    if (!devs)
        return PyErr_NoMemory();
    kvt_err e;
    int n = kvt_rdma_devices(devs, KVT_RDMA_MAX_DEVICES, &e);
    if (n < 0) {
        free(devs);
        return raise_err(&e, -1);
    }
    PyObject *l = PyList_New(0);
    for (int i = 0; l && i < n; i++) {
        const kvt_rdma_device *d = &devs[i];
        PyObject *ports = PyList_New(0);
        for (int p = 0; ports && p < d->nports; p++) {
            PyObject *x = rdma_port_dict(&d->ports[p]);
            if (!x || PyList_Append(ports, x) < 0)
                Py_CLEAR(ports);
            Py_XDECREF(x);
        }
        PyObject *x = !ports ? NULL
                      : d->error[0] ? Py_BuildValue("{s:s,s:s,s:N}", "name", d->name, "error", d->error, "ports", ports)
                                    : Py_BuildValue("{s:s,s:s,s:i,s:i,s:i,s:K,s:N}", "name", d->name, "fw", d->fw,
                                                    "max_qp_wr", d->max_qp_wr, "max_sge", d->max_sge, "max_qp_rd_atom",
                                                    d->max_qp_rd_atom, "max_mr_size", d->max_mr_size, "ports", ports);
        if (!x || PyList_Append(l, x) < 0)
            Py_CLEAR(l);
        Py_XDECREF(x);
    }
    free(devs);
    return l;
}

/* cuda_dmabuf(ptr, nbytes) -> offset: exports a dma-buf of the allocation (and closes it). */
static PyObject *mod_cuda_dmabuf(PyObject *m, PyObject *args)
{
    unsigned long long ptr, len;
    if (!PyArg_ParseTuple(args, "KK", &ptr, &len))
        return NULL;
    int fd = -1;
    uint64_t off = 0;
    kvt_err e;
    if (kvt_cuda_dmabuf(ptr, len, &fd, &off, &e) < 0)
        return raise_err(&e, -1);
    close(fd);
    return PyLong_FromUnsignedLongLong(off);
}

static PyObject *mod_cuda_available(PyObject *m, PyObject *noargs)
{
    kvt_err e;
    if (kvt_cuda_available(&e) < 0)
        return Py_BuildValue("(Os)", Py_False, e.msg);
    return Py_BuildValue("(Os)", Py_True, "");
}

static PyObject *mod_cuda_copy_info(PyObject *m, PyObject *noargs)
{
    char buf[1400];
    kvt_err e;
    if (kvt_cuda_copy_info(buf, sizeof buf, &e) < 0)
        return Py_BuildValue("(Os)", Py_False, e.msg);
    return Py_BuildValue("(Os)", Py_True, buf);
}

/* cuda_gather(device, descs, variant=-1): descs a buffer of (src, dst, len) uint64
 * triples; runs them as one batched copy on the device and waits (benchmarks, tests).
 * variant: -1 as configured, else a kernel variant (csrc/cuda_copy.c lists them). */
static PyObject *mod_cuda_gather(PyObject *m, PyObject *args)
{
    int dev, variant = -1;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "iy*|i", &dev, &b, &variant))
        return NULL;
    if (b.len % sizeof(kvt_copy_desc) != 0) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "cuda_gather: descriptors are (src, dst, len) uint64 triples");
        return NULL;
    }
    kvt_err e;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kvt_cuda_gather_sync(dev, (const kvt_copy_desc *)b.buf, (size_t)b.len / sizeof(kvt_copy_desc), variant, &e);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    if (rc < 0)
        return raise_err(&e, -1);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"cuda_copy_info", mod_cuda_copy_info, METH_NOARGS, "(bool, how batched device copies run here)"},
    {"cuda_gather", mod_cuda_gather, METH_VARARGS, "cuda_gather(device, descs): one batched device copy, waited"},
    {"cuda_pointer_device", mod_cuda_pointer_device, METH_O, "CUDA device ordinal of a device pointer"},
    {"cuda_available", mod_cuda_available, METH_NOARGS, "(bool, reason)"},
    {"cuda_dmabuf", mod_cuda_dmabuf, METH_VARARGS, "cuda_dmabuf(ptr, nbytes) -> offset in the exported dma-buf"},
    {"verbs_devices", mod_verbs_devices, METH_NOARGS, "[{name, fw, ..., ports: [{port, state, ..., gids}]}]: RDMA devices as libibverbs lists them"},
    {NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "kvtransfer._C", "kvtransfer C core", -1,
                                       module_methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__C(void)
{
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&PeerType) < 0 || PyType_Ready(&TransferType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    Py_INCREF(&EngineType);
    PyModule_AddObject(m, "Engine", (PyObject *)&EngineType);
    PyModule_AddObject(m, "READ_REQ_BYTES", PyLong_FromSize_t(sizeof(kvt_read_req)));
    PyModule_AddIntConstant(m, "MAX_THREADS", KVT_MAX_THREADS);
    PyModule_AddIntConstant(m, "VERBS_MAX_QPS", KVT_VERBS_MAX_QPS);
    PyModule_AddIntConstant(m, "MEM_HOST", KVT_MEM_HOST);
    PyModule_AddIntConstant(m, "MEM_CUDA", KVT_MEM_CUDA);
    PyObject *names = PyTuple_New((Py_ssize_t)kvt_transport_count());
    for (size_t i = 0; names && i < kvt_transport_count(); i++)
        PyTuple_SET_ITEM(names, (Py_ssize_t)i, PyUnicode_FromString(kvt_transport_name(i)));
    PyModule_AddObject(m, "TRANSPORTS", names); /* in the order connect prefers them */
    return m;
}
