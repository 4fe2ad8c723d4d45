/*
 * Pre-issued sockets made, locked and counted in C (graft_confine.h).
 *
 * Each socket gets what confine/lifecycle.py gives one socket at a time:
 * the pre-issued mark (the kernel lets it connect only where the tenant is
 * granted), the listen guard, attached and locked, and an entry in the
 * count of the tenant's sockets (the kernel counts its close). Made in the
 * calling thread, which the caller has put in the tenant's network
 * namespace; owned by the tenant's uid through the thread's fsuid, put back
 * before returning (core/netns.py says why).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/bpf.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "graft_confine.h"
#include "graft_maps.h"

#define EXPORT __attribute__((visibility("default")))

#ifndef SO_ATTACH_BPF
#define SO_ATTACH_BPF 50
#endif
#ifndef SO_LOCK_FILTER
#define SO_LOCK_FILTER 44
#endif

_Static_assert(sizeof(struct graft_mark) == sizeof(((struct graft_issue_config *)0)->mark),
               "graft_issue_config.mark holds one struct graft_mark");

static int map_update(int map_fd, const void *key, const void *value)
{
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    a.map_fd = (uint32_t)map_fd;
    a.key = (uint64_t)(uintptr_t)key;
    a.value = (uint64_t)(uintptr_t)value;
    a.flags = BPF_ANY;
    return syscall(SYS_bpf, BPF_MAP_UPDATE_ELEM, &a, sizeof a) < 0 ? -errno : 0;
}

static int lock_and_count(const struct graft_issue_config *c, int fd)
{
    int one = 1, err;

    if ((err = map_update(c->marks_fd, &fd, c->mark)) < 0)
        return err;
    if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_BPF, &c->guard_fd, sizeof c->guard_fd) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_LOCK_FILTER, &one, sizeof one) < 0)
        return -errno;
    return map_update(c->counts_fd, &fd, &c->count_id);
}

/*
 * A batch's sockets usually take consecutive numbers (socket() gives the
 * lowest free one), so each run of them is one close_range: at 64 a batch
 * that is one system call where there were 64. Only numbers of the batch
 * are in a run; a kernel without close_range (before 5.9) gets close().
 */
EXPORT void graft_issue_close(const int *fds, int n)
{
    for (int i = 0; i < n;) {
        int end = i + 1;
        while (end < n && fds[end] == fds[end - 1] + 1)
            end++;
        if (end - i == 1 || syscall(SYS_close_range, (unsigned)fds[i], (unsigned)fds[end - 1], 0) != 0)
            for (int j = i; j < end; j++)
                close(fds[j]);
        i = end;
    }
}

EXPORT int graft_issue(struct graft_issue_config *c, int n, int *fds)
{
    int made = 0, err = 0;

    c->failed_locking = 0;
    /* setfsuid reports no error, only the fsuid in force: asking twice tells whether it took. */
    int before = setfsuid(c->owner_uid);
    if ((uint32_t)setfsuid(c->owner_uid) != c->owner_uid) {
        setfsuid((uid_t)before);
        return -EPERM;
    }
    for (; made < n; made++) {
        fds[made] = socket(c->family, c->type | SOCK_NONBLOCK | SOCK_CLOEXEC, c->protocol);
        if (fds[made] < 0) {
            err = -errno;
            break;
        }
    }
    setfsuid((uid_t)before);
    for (int i = 0; err == 0 && i < made; i++)
        if ((err = lock_and_count(c, fds[i])) < 0)
            c->failed_locking = 1;
    if (err < 0) {
        /* None leaves: a socket counted but closed is a close the kernel counts too. */
        graft_issue_close(fds, made);
        return err;
    }
    return 0;
}
