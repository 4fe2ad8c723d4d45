/*
 * real.h: the libc functions that libgraft.so interposes, as the next
 * library in the lookup order defines them.
 *
 * Every call the shim makes to an interposed function for its own purposes
 * (broker connections, installing a host socket, probes) must go through
 * graft_real: calling the plain name would resolve to our own interposer,
 * because the preloaded library is first in the global lookup scope.
 */
#ifndef GRAFT_REAL_H
#define GRAFT_REAL_H

#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/types.h>

struct graft_real_fns {
    int (*socket)(int domain, int type, int protocol);
    int (*setsockopt)(int fd, int level, int name, const void *val, socklen_t len);
    int (*connect)(int fd, const struct sockaddr *addr, socklen_t len);
    int (*bind)(int fd, const struct sockaddr *addr, socklen_t len);
    int (*listen)(int fd, int backlog);
    int (*close)(int fd);
    int (*dup2)(int oldfd, int newfd);
    int (*dup3)(int oldfd, int newfd, int flags);
    int (*close_range)(unsigned int first, unsigned int last, int flags);
    ssize_t (*sendto)(int fd, const void *buf, size_t n, int flags, const struct sockaddr *addr,
                      socklen_t len);
    ssize_t (*sendmsg)(int fd, const struct msghdr *msg, int flags);
    int (*sendmmsg)(int fd, void *msgvec, unsigned int vlen, int flags); /* struct mmsghdr * */
    int (*getsockname)(int fd, struct sockaddr *addr, socklen_t *len);
    int (*dup)(int fd);
    int (*fcntl)(int fd, int cmd, ...);
    int (*fcntl64)(int fd, int cmd, ...);
    int (*epoll_ctl)(int epfd, int op, int fd, struct epoll_event *event);
};

extern struct graft_real_fns graft_real;

/* Resolves every entry; aborts the process if one cannot be found. Call once. */
void graft_real_init(void);

#endif /* GRAFT_REAL_H */
