/*
 * Unit test of shim/fdtable.c with fd numbers far above what RLIMIT_NOFILE
 * lets a test process open (machines without CAP_SYS_RESOURCE cap it near
 * 20000): the table has no fixed size that a large fd can overflow, and
 * every page is independent. The table never touches the fds themselves,
 * so synthetic numbers test it fully; so do the state changes of a
 * placeholder on a pre-issued host socket (fdt_replace, fdt_reclaim). Exits
 * 0 when every check holds.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "fdtable.h"

static int failures;

#define CHECK(cond)                                                        \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                                    \
        }                                                                  \
    } while (0)

static void placeholder_lifecycle(int fd, ino_t ino)
{
    struct fdt_sock desc, out;
    memset(&desc, 0, sizeof desc);
    desc.family = AF_INET;
    desc.type = SOCK_STREAM;

    CHECK(fdt_in_range(fd));
    fdt_track(fd, ino, &desc);
    CHECK(fdt_is_placeholder(fd));
    CHECK(fdt_record_opt(fd, SOL_SOCKET, SO_KEEPALIVE, &(int){1}, sizeof(int)) == FDT_OPT_RECORDED);
    CHECK(fdt_claim(fd, ino + 1, &out) == FDT_UNTRACKED); /* another inode: stale entry */
    fdt_track(fd, ino, &desc);
    CHECK(fdt_claim(fd, ino, &out) == FDT_CLAIMED);
    CHECK(out.family == AF_INET && out.type == SOCK_STREAM);
    CHECK(fdt_claim(fd, ino, &out) == FDT_DECIDED); /* BUSY: nobody else may decide it */
    fdt_release(fd, out.gen, FDT_GRAFTED);
    CHECK(!fdt_is_placeholder(fd) && fdt_is_tracked(fd));
    fdt_drop(fd);
    CHECK(!fdt_is_tracked(fd));
}

/* An install that records what it was asked to do and fails on one fd number. */
struct installs {
    int n, fail_fd;
    int fd[4];
    ino_t expected[4];
};

static int record_install(int fd, ino_t placeholder_ino, const struct fdt_polls *polls, void *arg)
{
    struct installs *r = arg;
    (void)polls;
    if (r->n < 4) {
        r->fd[r->n] = fd;
        r->expected[r->n] = placeholder_ino;
    }
    r->n++;
    return fd == r->fail_fd ? EBADF : 0;
}

/* socket() took a pre-issued TCP socket for fd. */
static void track_on_host(int fd, ino_t ino)
{
    struct fdt_sock desc;
    memset(&desc, 0, sizeof desc);
    desc.family = AF_INET;
    desc.type = SOCK_STREAM;
    desc.on_host = true;
    fdt_track(fd, ino, &desc);
}

/* A placeholder on a pre-issued host socket, and its duplicate, get a container socket together. */
static void host_placeholder_replaced(void)
{
    struct fdt_sock out, other;
    track_on_host(10, 500);
    fdt_dup(10, 11, 500);
    CHECK(fdt_is_host_placeholder(10) && fdt_is_host_placeholder(11));

    CHECK(fdt_claim(10, 500, &out) == FDT_CLAIMED && out.on_host);
    struct installs failing = {.fail_fd = 10};
    CHECK(fdt_replace(10, out.gen, 600, record_install, &failing) == EBADF);
    CHECK(failing.n == 1); /* nothing more is tried: the ring stays on the host socket */
    struct installs r = {.fail_fd = -1};
    CHECK(fdt_replace(10, out.gen, 600, record_install, &r) == 0);
    CHECK(r.n == 2 && r.fd[0] == 10 && r.fd[1] == 11 && r.expected[0] == 500 && r.expected[1] == 500);
    CHECK(fdt_claim(11, 600, &other) == FDT_DECIDED); /* the claim goes on, for the whole ring */
    fdt_release(10, out.gen, FDT_PLACEHOLDER);
    CHECK(fdt_is_placeholder(11) && !fdt_is_host_placeholder(10) && !fdt_is_host_placeholder(11));
    /* The duplicate has the container socket's inode too, and is still in the ring. */
    CHECK(fdt_claim(11, 600, &other) == FDT_CLAIMED && !other.on_host);
    CHECK(fdt_claim(10, 600, &out) == FDT_DECIDED);
    fdt_release(11, other.gen, FDT_GRAFTED);
    CHECK(fdt_is_tracked(10) && !fdt_is_placeholder(10));
    fdt_drop(10);
    fdt_drop(11);
}

/* A connect in place that the kernel refused is claimed back from GRAFTED, once, by its own claim. */
static void grafted_in_place_reclaimed(void)
{
    struct fdt_sock out, again;
    track_on_host(12, 700);
    CHECK(fdt_claim(12, 700, &out) == FDT_CLAIMED);
    CHECK(!fdt_reclaim(12, out.gen, &again)); /* BUSY, not GRAFTED */
    fdt_release(12, out.gen, FDT_GRAFTED);
    CHECK(!fdt_reclaim(12, out.gen + 1, &again)); /* another claim's */
    CHECK(fdt_reclaim(12, out.gen, &again) && again.on_host && again.gen == out.gen);
    CHECK(!fdt_reclaim(12, out.gen, &again)); /* claimed already */
    fdt_release(12, out.gen, FDT_PLACEHOLDER);
    CHECK(fdt_is_host_placeholder(12));
    fdt_drop(12);
    track_on_host(12, 700);
    CHECK(fdt_claim(12, 700, &out) == FDT_CLAIMED);
    fdt_release(12, out.gen, FDT_GRAFTED);
    fdt_drop(12); /* closed meanwhile */
    CHECK(!fdt_reclaim(12, out.gen, &again));
}

int main(void)
{
    fdt_init();
    placeholder_lifecycle(3, 1000);
    placeholder_lifecycle(65537, 1001);             /* the bound */
    placeholder_lifecycle(100000, 1002);            /* another page */
    placeholder_lifecycle((1 << 30) - 1, 1003);     /* the last trackable fd */
    CHECK(!fdt_in_range(1 << 30));                  /* beyond: passed through, never stored */
    CHECK(!fdt_is_tracked(1 << 30));

    /* Entries on different pages do not disturb each other. */
    struct fdt_sock desc;
    memset(&desc, 0, sizeof desc);
    desc.family = AF_INET6;
    desc.type = SOCK_DGRAM;
    fdt_track(70000, 7, &desc);
    fdt_track(70000 + 32768, 8, &desc);
    fdt_drop_range(70001, 1 << 29);
    CHECK(fdt_is_placeholder(70000) && !fdt_is_tracked(70000 + 32768));

    host_placeholder_replaced();
    grafted_in_place_reclaimed();

    if (failures == 0)
        printf("fdtable: all checks passed\n");
    return failures != 0;
}
