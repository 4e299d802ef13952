#include "err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static void set_op(kvt_err *e, int errnum, const char *op)
{
    e->code = -errnum;
    snprintf(e->op, sizeof e->op, "%s", op);
}

int kvt_syserr(kvt_err *e, int errnum, const char *op, const char *argsfmt, ...)
{
    if (!e)
        return -errnum;
    char args[256];
    va_list ap;
    va_start(ap, argsfmt);
    vsnprintf(args, sizeof args, argsfmt, ap);
    va_end(ap);
    set_op(e, errnum, op);
    snprintf(e->msg, sizeof e->msg, "%s(%s): errno %d, %s", op, args, errnum, strerror(errnum));
    return -errnum;
}

int kvt_error(kvt_err *e, int errnum, const char *op, const char *fmt, ...)
{
    if (!e)
        return -errnum;
    char text[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    set_op(e, errnum, op);
    snprintf(e->msg, sizeof e->msg, "%s: %s (errno %d, %s)", op, text, errnum, strerror(errnum));
    return -errnum;
}
