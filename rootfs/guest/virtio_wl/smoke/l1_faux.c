// SPDX-License-Identifier: Apache-2.0
/*
 * l1_faux: /init of a QEMU-emulated host (L1) that plays the hub for the faux accept:
 * VMM "server" has a listener context socket "listen" (L1 accepts it); VMM "client" has
 * "wayland" pointing at L1's relay socket. When the client connects, L1 hands a fresh
 * connection to the server VMM with `bulkhead-vmmctl wl-add --connect`, sends the chosen
 * name over the listener connection, and relays bytes between the two connections.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

static int listen_at(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	strncpy(sa.sun_path, path, sizeof(sa.sun_path) - 1);
	if (bind(s, (void *)&sa, sizeof(sa)) || listen(s, 4))
		printf("L1: bind %s failed %d\n", path, errno);
	return s;
}

static void load(const char *p)
{
	int fd = open(p, O_RDONLY);

	if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) && errno != EEXIST))
		printf("L1: cannot load %s: %d\n", p, errno);
	close(fd);
}

static pid_t vmm(const char *role, const char *wl, const char *ctl)
{
	pid_t p = fork();
	char cmdline[128];

	if (p)
		return p;
	snprintf(cmdline, sizeof(cmdline), "console=ttyS0 panic=-1 quiet -- %s", role);
	execl("/bin/bulkhead-vmm", "bulkhead-vmm", "--kernel", "/l2/vmlinuz", "--initramfs",
	      "/l2/initramfs.cpio", "--cmdline", cmdline, "--memory", "192M", "--serial-input",
	      "false", "--wl-socket", wl, "--control-socket", ctl, NULL);
	_exit(127);
}

static void relay(int a, int b)
{
	char buf[4096];

	for (;;) {
		struct pollfd p[2] = { { a, POLLIN, 0 }, { b, POLLIN, 0 } };
		int i;

		if (poll(p, 2, -1) < 0)
			return;
		for (i = 0; i < 2; i++) {
			if (p[i].revents) {
				int n = read(p[i].fd, buf, sizeof(buf));

				if (n <= 0)
					return;
				write(p[1 - i].fd, buf, n);
			}
		}
	}
}

int main(void)
{
	int listen_srv, relay_srv, conn_srv, lctx, client, server, st, i;
	char name[64] = { 0 };
	int pfd[2];
	pid_t a, b, c;

	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	mount("proc", "/proc", "proc", 0, NULL);
	mount("tmpfs", "/tmp", "tmpfs", 0, NULL);
	setvbuf(stdout, NULL, _IONBF, 0);
	load("/lib/irqbypass.ko");
	load("/lib/kvm.ko");
	load("/lib/kvm-amd.ko");
	listen_srv = listen_at("/tmp/listen.sock");
	relay_srv = listen_at("/tmp/relay.sock");
	conn_srv = listen_at("/tmp/conn.sock");
	a = vmm("server", "listen=/tmp/listen.sock", "/tmp/server.ctl");
	lctx = accept4(listen_srv, NULL, NULL, SOCK_CLOEXEC);
	printf("L1: server listener context connected\n");
	b = vmm("client", "wayland=/tmp/relay.sock", "/tmp/client.ctl");
	client = accept4(relay_srv, NULL, NULL, SOCK_CLOEXEC);
	printf("L1: client connected; handing a connection to the server VMM\n");
	if (pipe2(pfd, O_CLOEXEC))
		return 1;
	c = fork();
	if (c == 0) {
		dup2(pfd[1], 1);
		execl("/bin/bulkhead-vmmctl", "bulkhead-vmmctl", "/tmp/server.ctl", "wl-add",
		      "--name", "wl-conn-%d", "--connect", "/tmp/conn.sock", NULL);
		_exit(127);
	}
	close(pfd[1]);
	server = accept4(conn_srv, NULL, NULL, SOCK_CLOEXEC);
	for (i = 0; i < (int)sizeof(name) - 1; i++)
		if (read(pfd[0], &name[i], 1) != 1 || name[i] == '\n')
			break;
	waitpid(c, &st, 0);
	printf("L1: vmmctl status %d, name %s", WEXITSTATUS(st), name);
	write(lctx, name, strlen(name));
	relay(client, server);
	waitpid(a, &st, 0);
	printf("L1: server vmm exit status %d\n", WEXITSTATUS(st));
	waitpid(b, &st, 0);
	printf("L1: client vmm exit status %d\n", WEXITSTATUS(st));
	reboot(RB_POWER_OFF);
	return 0;
}
