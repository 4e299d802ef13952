#define _GNU_SOURCE
#include "sock.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define SOCK_BUF_BYTES (4 << 20)

int kvt_sock_setup(int fd, int timeout_ms, kvt_err *err)
{
    int one = 1, buf = SOCK_BUF_BYTES;
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        return kvt_syserr(err, errno, "setsockopt", "TCP_NODELAY");
    /* best effort: the kernel caps these at net.core.[rw]mem_max */
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0)
        return kvt_syserr(err, errno, "setsockopt", "SO_SNDTIMEO/SO_RCVTIMEO=%dms", timeout_ms);
    return 0;
}

static void advance(struct iovec **iov, size_t *n, size_t got)
{
    while (*n && got >= (*iov)->iov_len) {
        got -= (*iov)->iov_len;
        (*iov)++;
        (*n)--;
    }
    if (*n && got) {
        (*iov)->iov_base = (char *)(*iov)->iov_base + got;
        (*iov)->iov_len -= got;
    }
}

static int io_error(int en, const char *call, int fd, const char *what, kvt_err *err)
{
    if (en == EAGAIN || en == EWOULDBLOCK)
        return kvt_error(err, ETIMEDOUT, call, "fd=%d, %s: no progress before the socket timeout", fd, what);
    return kvt_syserr(err, en, call, "fd=%d, %s", fd, what);
}

int kvt_send_iov(int fd, struct iovec *iov, size_t n, const char *what, kvt_err *err)
{
    while (n) {
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = n < IOV_MAX ? n : IOV_MAX};
        ssize_t r = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return io_error(errno, "sendmsg", fd, what, err);
        }
        advance(&iov, &n, (size_t)r);
    }
    return 0;
}

int kvt_recv_iov(int fd, struct iovec *iov, size_t n, const char *what, kvt_err *err)
{
    while (n) {
        /* skip empty elements so that 0 from the kernel always means EOF */
        if (iov->iov_len == 0) {
            iov++;
            n--;
            continue;
        }
        ssize_t r = readv(fd, iov, n < IOV_MAX ? (int)n : IOV_MAX);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return io_error(errno, "readv", fd, what, err);
        }
        if (r == 0)
            return kvt_error(err, ECONNRESET, "readv", "fd=%d, %s: peer closed the connection", fd, what);
        advance(&iov, &n, (size_t)r);
    }
    return 0;
}

int kvt_send_all(int fd, const void *buf, size_t len, const char *what, kvt_err *err)
{
    struct iovec v = {(void *)buf, len};
    return kvt_send_iov(fd, &v, 1, what, err);
}

int kvt_recv_all(int fd, void *buf, size_t len, const char *what, kvt_err *err)
{
    struct iovec v = {buf, len};
    return kvt_recv_iov(fd, &v, 1, what, err);
}

int kvt_tcp_dial(const char *host, int port, int timeout_ms, kvt_err *err)
{
    char ports[16];
    snprintf(ports, sizeof ports, "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int g = getaddrinfo(host, ports, &hints, &res);
    if (g != 0)
        return kvt_error(err, EHOSTUNREACH, "getaddrinfo", "%s:%d: %s", host, port, gai_strerror(g));
    int rc = -EHOSTUNREACH;
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        int fd = socket(a->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0) {
            rc = kvt_syserr(err, errno, "socket", "family=%d", a->ai_family);
            continue;
        }
        int en = 0;
        if (connect(fd, a->ai_addr, a->ai_addrlen) < 0) {
            en = errno;
            if (en == EINPROGRESS) {
                struct pollfd pf = {.fd = fd, .events = POLLOUT};
                int pr;
                do
                    pr = poll(&pf, 1, timeout_ms);
                while (pr < 0 && errno == EINTR);
                socklen_t sl = sizeof en;
                if (pr == 0)
                    en = ETIMEDOUT;
                else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &en, &sl) < 0)
                    en = errno;
            }
        }
        if (en == 0) {
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
            freeaddrinfo(res);
            return fd;
        }
        rc = kvt_syserr(err, en, "connect", "%s:%d, timeout %d ms", host, port, timeout_ms);
        close(fd);
    }
    freeaddrinfo(res);
    return rc;
}
