/* Blocking socket helpers for the tcp transport: whole-buffer sends and receives
 * that survive short counts and EINTR, with the socket's own timeouts as deadlines. */
#ifndef KVT_SOCK_H
#define KVT_SOCK_H

#include <stddef.h>
#include <sys/uio.h>

#include "err.h"

/* Sets TCP_NODELAY, large buffers and SO_SNDTIMEO/SO_RCVTIMEO = timeout_ms. */
int kvt_sock_setup(int fd, int timeout_ms, kvt_err *err);
/* 0, or -errno (-ETIMEDOUT on a socket timeout, -ECONNRESET on EOF). */
int kvt_send_iov(int fd, struct iovec *iov, size_t n, const char *what, kvt_err *err);
int kvt_recv_iov(int fd, struct iovec *iov, size_t n, const char *what, kvt_err *err);
int kvt_send_all(int fd, const void *buf, size_t len, const char *what, kvt_err *err);
int kvt_recv_all(int fd, void *buf, size_t len, const char *what, kvt_err *err);
/* Connects with a deadline; returns the fd or -errno. */
int kvt_tcp_dial(const char *host, int port, int timeout_ms, kvt_err *err);

#endif
