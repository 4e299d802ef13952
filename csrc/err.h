/* Errors of the C core: every failing call returns -errno and fills a kvt_err that
 * names the operation and its arguments, so Python can raise one exception that says
 * what failed, with what, and why. No Python here. */
#ifndef KVT_ERR_H
#define KVT_ERR_H

typedef struct kvt_err {
    int code;       /* -errno, 0 when no error */
    char op[64];    /* the failing call or operation, e.g. "process_vm_readv" */
    char msg[512];  /* full human text, e.g. "process_vm_readv(pid=7, iovcnt=3): errno 3, No such process" */
} kvt_err;

/* A failed system or library call: "op(args): errno N, strerror". Returns -errnum. */
int kvt_syserr(kvt_err *e, int errnum, const char *op, const char *argsfmt, ...)
    __attribute__((format(printf, 4, 5)));

/* A refusal or bad input: "op: text (errno N, strerror)". Returns -errnum. */
int kvt_error(kvt_err *e, int errnum, const char *op, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static inline void kvt_err_clear(kvt_err *e) { if (e) { e->code = 0; e->op[0] = 0; e->msg[0] = 0; } }

#endif
