// SPDX-License-Identifier: Apache-2.0
/*
 * l1_bench: /init of a QEMU-emulated host (L1) for the virtio_wl round-trip benchmark: runs
 * bulkhead-vmm with the wl_bench guest and echoes every message (closing received fds), then
 * measures the same 64-byte round trip over a plain socketpair on L1 itself, with and
 * without an fd (a memfd) attached. Prints `L1: socketpair rtt_ns=<x> fd_rtt_ns=<y>`.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define ROUNDS 300

static void load(const char *p)
{
	int fd = open(p, O_RDONLY);

	if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) && errno != EEXIST))
		printf("L1: cannot load %s: %d\n", p, errno);
	close(fd);
}

/* Receives one message, closing any fds; returns its length. */
static int recv_close(int s, char *buf, size_t len)
{
	char cbuf[CMSG_SPACE(28 * sizeof(int))];
	struct iovec iov = { buf, len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *c;
	int n = recvmsg(s, &mh, MSG_CMSG_CLOEXEC);

	for (c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_type == SCM_RIGHTS) {
			int k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int), fd;

			for (int i = 0; i < k; i++) {
				memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
				close(fd);
			}
		}
	}
	return n;
}

static void send_fd(int s, const char *buf, size_t len, int fd)
{
	char cbuf[CMSG_SPACE(sizeof(int))] = { 0 };
	struct iovec iov = { (void *)buf, len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	struct cmsghdr *c;

	if (fd >= 0) {
		mh.msg_control = cbuf;
		mh.msg_controllen = sizeof(cbuf);
		c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &fd, sizeof(int));
	}
	sendmsg(s, &mh, 0);
}

static long long now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static long long socketpair_rtt(int with_fd)
{
	char buf[64] = { 7 };
	int sv[2], memfd = memfd_create("b", 0), i;
	long long t;
	pid_t p;

	socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
	p = fork();
	if (p == 0) {
		close(sv[0]); /* or the echo never sees EOF */
		for (;;) {
			int n = recv_close(sv[1], buf, sizeof(buf));

			if (n <= 0)
				_exit(0);
			write(sv[1], buf, n);
		}
	}
	for (i = 0; i < 20; i++) {
		send_fd(sv[0], buf, 64, -1);
		read(sv[0], buf, 64);
	}
	t = now_ns();
	for (i = 0; i < ROUNDS; i++) {
		send_fd(sv[0], buf, 64, with_fd ? memfd : -1);
		read(sv[0], buf, 64);
	}
	t = (now_ns() - t) / ROUNDS;
	close(sv[0]);
	waitpid(p, NULL, 0);
	close(sv[1]);
	close(memfd);
	return t;
}

int main(void)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX, .sun_path = "/tmp/wl.sock" };
	char buf[4096];
	int srv, c, st;
	pid_t v;

	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	mount("proc", "/proc", "proc", 0, NULL);
	mount("tmpfs", "/tmp", "tmpfs", 0, NULL);
	setvbuf(stdout, NULL, _IONBF, 0);
	load("/lib/irqbypass.ko");
	load("/lib/kvm.ko");
	load("/lib/kvm-amd.ko");
	srv = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	bind(srv, (void *)&sa, sizeof(sa));
	listen(srv, 1);
	v = fork();
	if (v == 0) {
		execl("/bin/bulkhead-vmm", "bulkhead-vmm", "--kernel", "/l2/vmlinuz", "--initramfs",
		      "/l2/initramfs.cpio", "--cmdline", "console=ttyS0 panic=-1 quiet -- close",
		      "--memory", "256M", "--serial-input", "false", "--wl-socket", "/tmp/wl.sock",
		      NULL);
		_exit(127);
	}
	c = accept4(srv, NULL, NULL, SOCK_CLOEXEC);
	for (;;) {
		int n = recv_close(c, buf, sizeof(buf));

		if (n <= 0 || (n == 4 && !memcmp(buf, "quit", 4)))
			break;
		write(c, buf, n);
	}
	close(c);
	printf("L1: echo done, waiting for the VMM\n");
	waitpid(v, &st, 0);
	printf("L1: vmm exit status %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
	printf("L1: socketpair rtt_ns=%lld fd_rtt_ns=%lld\n", socketpair_rtt(0), socketpair_rtt(1));
	reboot(RB_POWER_OFF);
	return 0;
}
