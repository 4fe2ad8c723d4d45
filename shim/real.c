/*
 * real.c: resolves the functions libgraft.so interposes with
 * dlsym(RTLD_NEXT), so that the shim can fall through to libc (or to another
 * preloaded interposer further down the chain).
 */
#define _GNU_SOURCE
#include "real.h"

#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct graft_real_fns graft_real;

/*
 * In a dynamically linked program RTLD_NEXT always finds libc's definitions
 * (glibc >= 2.34 provides all of them). If it does not, the shim can neither
 * graft nor pass calls through, so stopping loudly beats misbehaving quietly.
 */
static void *resolve(const char *name)
{
    void *fn = dlsym(RTLD_NEXT, name);
    if (fn == NULL) {
        static const char msg1[] = "graft: cannot resolve the next definition of ";
        static const char msg2[] = "(); libgraft.so must be preloaded into a dynamically linked program\n";
        if (write(STDERR_FILENO, msg1, sizeof msg1 - 1) < 0 ||
            write(STDERR_FILENO, name, strlen(name)) < 0 ||
            write(STDERR_FILENO, msg2, sizeof msg2 - 1) < 0) {
            /* Nothing more we can do about stderr. */
        }
        abort();
    }
    return fn;
}

#ifndef __GLIBC__
/*
 * musl (1.2.3) defines neither close_range() nor fcntl64(), so its programs
 * never call the shim's; resolving them would abort every program. The
 * shim's own calls get the system call, and fcntl.
 */
#include <sys/syscall.h>

static int raw_close_range(unsigned int first, unsigned int last, int flags)
{
    return (int)syscall(SYS_close_range, first, last, flags);
}
#endif

#define RESOLVE(name) (graft_real.name = (__typeof__(graft_real.name))resolve(#name))

void graft_real_init(void)
{
    RESOLVE(socket);
    RESOLVE(setsockopt);
    RESOLVE(connect);
    RESOLVE(bind);
    RESOLVE(listen);
    RESOLVE(close);
    RESOLVE(dup2);
    RESOLVE(dup3);
#ifdef __GLIBC__
    RESOLVE(close_range);
#else
    graft_real.close_range = raw_close_range;
#endif
    RESOLVE(sendto);
    RESOLVE(sendmsg);
    RESOLVE(sendmmsg);
    RESOLVE(getsockname);
    RESOLVE(dup);
    RESOLVE(fcntl);
#ifdef __GLIBC__
    RESOLVE(fcntl64);
#else
    graft_real.fcntl64 = graft_real.fcntl; /* musl's off_t is 64-bit: fcntl is fcntl64 */
#endif
    RESOLVE(epoll_ctl);
}
