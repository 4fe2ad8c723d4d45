/*
 * Pre-issued sockets made, locked and counted in C (graft_confine.h).
 *
 * Each socket gets what confine/lifecycle.py gives one socket at a time:
 * the pre-issued mark (the kernel lets it connect only where the tenant is
 * granted), the listen guard, attached and locked, and an entry in the
 * count of the tenant's sockets (the kernel counts its close). The mark and
 * the count are the kernel's to set as it creates them (stamps, below),
 * or set from here. Made in the
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

static int map_call(int cmd, int map_fd, const void *key, void *value)
{
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    a.map_fd = (uint32_t)map_fd;
    a.key = (uint64_t)(uintptr_t)key;
    a.value = (uint64_t)(uintptr_t)value;
    a.flags = BPF_ANY;
    return syscall(SYS_bpf, cmd, &a, sizeof a) < 0 ? -errno : 0;
}

static int map_update(int map_fd, const void *key, const void *value)
{
    return map_call(BPF_MAP_UPDATE_ELEM, map_fd, key, (void *)value);
}

static int mark_and_count(const struct graft_issue_config *c, int fd)
{
    int err = map_update(c->marks_fd, &fd, c->mark);
    return err < 0 ? err : map_update(c->counts_fd, &fd, &c->count_id);
}

static int guard(const struct graft_issue_config *c, int fd)
{
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_BPF, &c->guard_fd, sizeof c->guard_fd) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_LOCK_FILTER, &one, sizeof one) < 0)
        return -errno;
    return 0;
}

/* The key the kernel's bpf_get_current_pid_tgid gives this thread (the caller knows it is in the initial pid namespace). */
static uint64_t pid_tgid(void)
{
    return (uint64_t)getpid() << 32 | (uint32_t)syscall(SYS_gettid);
}

/* This thread's batch is stamped: each socket it creates gets its mark and count id from the kernel. */
static int stamp(const struct graft_issue_config *c, uint64_t key)
{
    struct graft_stamp s;
    memset(&s, 0, sizeof s);
    memcpy(&s.mark, c->mark, sizeof s.mark);
    s.count_id = c->count_id;
    return map_update(c->stamps_fd, &key, &s);
}

/* The stamp taken out: how many sockets the kernel stamped (-1 if it cannot be read). */
static int64_t unstamp(const struct graft_issue_config *c, uint64_t key)
{
    struct graft_stamp s;
    int got = map_call(BPF_MAP_LOOKUP_ELEM, c->stamps_fd, &key, &s);
    map_call(BPF_MAP_DELETE_ELEM, c->stamps_fd, &key, NULL); /* fails only if it is gone: nothing to undo */
    return got < 0 ? -1 : (int64_t)s.made;
}

/* How many of fds the kernel counts (an entry in counts): their closes are counted, whatever else failed. */
static int counted(const struct graft_issue_config *c, const int *fds, int n)
{
    uint32_t id;
    int k = 0;
    for (int i = 0; i < n; i++)
        k += map_call(BPF_MAP_LOOKUP_ELEM, c->counts_fd, &fds[i], &id) == 0;
    return k;
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

/*
 * With stamps, the kernel marks and counts each socket as it is created
 * (programs.py's create program), which two map updates per socket from
 * here did at a third of the broker's time per fast-path connect. The
 * stamp's count of sockets it stamped must be the batch's, or (no create
 * program attached, a kernel that refused it, a stamp that could not be
 * put in) the updates are made from here as before: no socket leaves
 * unmarked either way.
 *
 * A socket() that fails for want of an fd (EMFILE) has created the socket,
 * stamped and counted it, and released it: the kernel counted that close
 * too, so a batch cut short counts what the stamp says, not the fds made.
 */
EXPORT int graft_issue(struct graft_issue_config *c, int n, int *fds)
{
    int made = 0, err = 0;
    int64_t stamped = -1; /* sockets the kernel stamped: -1, no stamp */
    uint64_t key = 0;

    c->failed_locking = c->stamped = c->counted = 0;
    /* setfsuid reports no error, only the fsuid in force: asking twice tells whether it took. */
    int before = setfsuid(c->owner_uid);
    if ((uint32_t)setfsuid(c->owner_uid) != c->owner_uid) {
        setfsuid((uid_t)before);
        return -EPERM;
    }
    if (c->stamps_fd >= 0 && stamp(c, key = pid_tgid()) == 0)
        stamped = 0;
    for (; made < n; made++) {
        fds[made] = socket(c->family, c->type | SOCK_NONBLOCK | SOCK_CLOEXEC, c->protocol);
        if (fds[made] < 0) {
            err = -errno;
            break;
        }
    }
    if (stamped == 0)
        stamped = unstamp(c, key);
    setfsuid((uid_t)before);
    c->stamped = stamped == made;
    for (int i = 0; err == 0 && i < made; i++)
        if ((c->stamped || (err = mark_and_count(c, fds[i])) == 0) && (err = guard(c, fds[i])) < 0)
            break;
    if (err < 0) {
        c->failed_locking = made == n;
        /* made short: no update from here yet, so what the kernel counted is what it stamped */
        c->counted = made < n && stamped >= 0 ? (int)stamped : counted(c, fds, made);
        graft_issue_close(fds, made);
        return err;
    }
    return 0;
}
