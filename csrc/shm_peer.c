/* What both halves of the shm transport share: the peer (its target process and
 * region table), process_vm_readv of a job's ranges, and the check after a copy that
 * its source regions outlived it. transport_shm.c (host) and transport_shm_cuda.c
 * (CUDA) both call down into this file; neither calls the other back. */
#define _GNU_SOURCE
#include "shm_peer.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>

static int target_alive(const shm_peer *s)
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
            if (!target_alive(s))
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
    const size_t n = job->batch ? 1 : job->n; /* a lazy job reads one region */
    for (size_t i = 0; i < n; i++) {
        uint64_t id = job->batch ? job->batch->remote_region : job->pieces[i].remote_region;
        if (id == last)
            continue;
        last = id;
        if (!kvt_shared_still_valid(s->table, id)) {
            *entry = (int64_t)job->pieces[i].entry;
            return kvt_error(e, ESTALE, "read", "remote region 0x%lx was deregistered during the read",
                             (unsigned long)id);
        }
    }
    if (!target_alive(s)) {
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
