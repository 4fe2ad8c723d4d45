/*
 * Unit test of shim/fdtable.c with fd numbers far above what RLIMIT_NOFILE
 * lets a test process open (machines without CAP_SYS_RESOURCE cap it near
 * 20000): the table has no fixed size that a large fd can overflow, and
 * every page is independent. The table never touches the fds themselves,
 * so synthetic numbers test it fully. Exits 0 when every check holds.
 */
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

    if (failures == 0)
        printf("fdtable: all checks passed\n");
    return failures != 0;
}
