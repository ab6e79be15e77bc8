/* LD_PRELOAD shim: bind an unbound IPv4 TCP socket to $REALSTACK_BIND before connect(), so a
 * client stack without a source-address option (c104's lib60870, dnp3py) speaks from its own
 * loopback address (127.0.0.x) and the hosts stay distinguishable in the capture. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real_connect)(int, const struct sockaddr *, socklen_t);
    if (!real_connect) real_connect = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    const char *src = getenv("REALSTACK_BIND");
    if (src && addr && addr->sa_family == AF_INET) {
        int type = 0;
        socklen_t tl = sizeof type;
        struct sockaddr_in me;
        socklen_t ml = sizeof me;
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) == 0 && type == SOCK_STREAM &&
            getsockname(fd, (struct sockaddr *)&me, &ml) == 0 && me.sin_port == 0) {
            struct sockaddr_in b;
            memset(&b, 0, sizeof b);
            b.sin_family = AF_INET;
            if (inet_pton(AF_INET, src, &b.sin_addr) == 1) bind(fd, (struct sockaddr *)&b, sizeof b);
        }
    }
    return real_connect(fd, addr, len);
}
