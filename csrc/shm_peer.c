/* What both halves of the shm transport share: the peer (its target process and
 * region table), process_vm_readv of a job's ranges, and the check after a copy that
 * its source regions outlived it. transport_shm.c (host) and transport_shm_cuda.c
 * (CUDA) both call down into this file; neither calls the other back. */
#define _GNU_SOURCE
#include "shm_peer.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

int kvt_shm_target_alive(const shm_peer *s)
{
    struct pollfd pf = {.fd = s->pidfd, .events = POLLIN};
    return poll(&pf, 1, 0) == 0; /* a pidfd turns readable when the process exits */
}

int kvt_shm_readv(shm_peer *s, struct iovec *liov, struct iovec *riov, size_t n, uint64_t bytes, uint64_t *done,
                  kvt_err *err)
{
    /* Local and remote lists have equal element lengths, so a short count advances
     * both the same way. */
    size_t first = 0;
    *done = 0;
    while (*done < bytes) {
        ssize_t got = process_vm_readv(s->pid, liov + first, n - first, riov + first, n - first, 0);
        if (got <= 0) {
            int en = got < 0 ? errno : EFAULT;
            if (!kvt_shm_target_alive(s))
                en = ESRCH;
            return kvt_syserr(err, en, "process_vm_readv", "pid=%d, iovcnt=%zu, after %lu of %lu bytes", (int)s->pid,
                              n - first, (unsigned long)*done, (unsigned long)bytes);
        }
        *done += (uint64_t)got;
        size_t left = (size_t)got;
        while (left && left >= liov[first].iov_len) {
            left -= liov[first].iov_len;
            first++;
        }
        if (left) {
            liov[first].iov_base = (char *)liov[first].iov_base + left;
            liov[first].iov_len -= left;
            riov[first].iov_base = (char *)riov[first].iov_base + left;
            riov[first].iov_len -= left;
        }
    }
    return 0;
}

int kvt_shm_verify(shm_peer *s, const kvt_job *job, kvt_err *e, int64_t *entry)
{
    /* Seqlock check: the bytes count only if every source region outlived the copy
     * and the target is the process we connected to. */
    uint64_t last = 0;
    const size_t n = job->paged ? 1 : job->n; /* a paged job reads one region */
    for (size_t i = 0; i < n; i++) {
        uint64_t id = job->paged ? job->paged->remote_region : job->pieces[i].remote_region;
        if (id == last)
            continue;
        last = id;
        if (!kvt_shared_still_valid(s->table, id)) {
            *entry = (int64_t)job->pieces[i].entry;
            return kvt_error(e, ESTALE, "read", "remote region 0x%lx was deregistered during the read",
                             (unsigned long)id);
        }
    }
    if (!kvt_shm_target_alive(s)) {
        *entry = (int64_t)job->pieces[0].entry;
        return kvt_error(e, ESRCH, "read", "target process %d exited during the read", (int)s->pid);
    }
    return 0;
}

int kvt_same_host(const kvt_engine_info *me, const kvt_engine_info *peer, kvt_reach *r)
{
    if (me->boot_id[0] && strcmp(me->boot_id, peer->boot_id) == 0 && me->pidns == peer->pidns) {
        snprintf(r->why, sizeof r->why, "same host (boot id %s, pid namespace %llu)", peer->boot_id,
                 (unsigned long long)peer->pidns);
        return 1;
    }
    r->code = EHOSTUNREACH;
    snprintf(r->why, sizeof r->why, "not the same host (boot id %s vs %s, pid namespace %llu vs %llu)", me->boot_id,
             peer->boot_id, (unsigned long long)me->pidns, (unsigned long long)peer->pidns);
    return 0;
}

int kvt_shm_map_table(const kvt_engine_info *peer, const kvt_shared_table **out, kvt_err *err)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)peer->pid, (int)peer->table_fd);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return kvt_syserr(err, errno, "open", "\"%s\", O_RDONLY", path);
    struct stat st;
    if (fstat(fd, &st) < 0 || (size_t)st.st_size < sizeof(kvt_shared_table)) {
        close(fd);
        return kvt_error(err, EPROTO, "connect", "%s is not a kvtransfer region table", path);
    }
    void *m = mmap(NULL, sizeof(kvt_shared_table), PROT_READ, MAP_SHARED, fd, 0);
    int en = errno;
    close(fd);
    if (m == MAP_FAILED)
        return kvt_syserr(err, en, "mmap", "%s, PROT_READ", path);
    const kvt_shared_table *t = m;
    if (t->magic != KVT_TABLE_MAGIC || t->version != KVT_TABLE_VERSION ||
        memcmp(t->engine_id, peer->id, sizeof peer->id) != 0) {
        munmap(m, sizeof(kvt_shared_table));
        return kvt_error(err, ESTALE, "connect", "%s belongs to another engine (pid reused?)", path);
    }
    *out = t;
    return 0;
}

int kvt_shm_peer_open(shm_peer *s, const kvt_engine_info *peer, kvt_err *err)
{
    if (peer->pid <= 0)
        return kvt_error(err, EINVAL, "connect", "peer has no pid");
    s->pid = peer->pid;
    s->same_process = peer->pid == getpid();
    s->pidfd = (int)syscall(SYS_pidfd_open, s->pid, 0);
    if (s->pidfd < 0)
        return kvt_syserr(err, errno, "pidfd_open", "pid=%d", (int)s->pid);
    int rc = kvt_shm_map_table(peer, &s->table, err);
    if (rc < 0) {
        close(s->pidfd);
        return rc;
    }
    /* Prove process_vm_readv works on this target (ptrace permission, right process)
     * by reading its engine id out of its own copy of the table. */
    uint8_t id[KVT_ENGINE_ID_LEN];
    struct iovec l = {id, sizeof id};
    struct iovec r = {(void *)(uintptr_t)(peer->table_addr + offsetof(kvt_shared_table, engine_id)), sizeof id};
    ssize_t got = process_vm_readv(s->pid, &l, 1, &r, 1, 0);
    if (got != (ssize_t)sizeof id || memcmp(id, peer->id, sizeof id) != 0) {
        rc = got < 0 ? kvt_syserr(err, errno, "process_vm_readv", "pid=%d, probe of %zu bytes", (int)s->pid, sizeof id)
                     : kvt_error(err, ESTALE, "connect", "pid %d is not the engine we were given", (int)s->pid);
        kvt_shm_peer_release(s);
        return rc;
    }
    return 0;
}

void kvt_shm_peer_release(shm_peer *s)
{
    munmap((void *)s->table, sizeof(kvt_shared_table));
    close(s->pidfd);
}

int kvt_shm_start_threads(kvt_peer *p, pthread_t *threads, int *n, void *(*fn)(void *), void *arg, kvt_err *err)
{
    for (int i = 0; i < *n; i++) {
        int e = pthread_create(&threads[i], NULL, fn, arg);
        if (e != 0) {
            *n = i;
            kvt_queue_close(&p->queue);
            p->ops->close(p);
            return kvt_syserr(err, e, "pthread_create", "%s worker %d", p->ops->name, i);
        }
    }
    return 0;
}
