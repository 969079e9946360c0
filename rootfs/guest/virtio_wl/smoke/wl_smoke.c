// SPDX-License-Identifier: Apache-2.0
/*
 * wl_smoke: a static /init for a throw-away guest that exercises /dev/wl0 against a host
 * peer (l1_init.c, which runs bulkhead-vmm in a QEMU-emulated host): loads the virtio
 * modules and virtio_wl.ko from /lib, connects the unnamed context, sends data + a shared-memory vfd + a pipe, receives the peer's answer with a
 * host memfd, and checks zero-copy sharing both ways and the pipe's data and hang-up.
 * Prints "WL-SMOKE OK" or "WL-SMOKE FAIL: ..." and powers off.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <linux/virtwl.h>

static void finish(const char *msg)
{
	if (msg)
		printf("WL-SMOKE FAIL: %s (errno %d %s)\n", msg, errno, strerror(errno));
	else
		printf("WL-SMOKE OK\n");
	fflush(stdout);
	sync();
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}

#define CHECK(cond, msg) do { if (!(cond)) finish(msg); } while (0)

static void load(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0) {
		printf("wl-smoke: open %s failed\n", path);
		finish(path);
	}
	if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST) {
		printf("wl-smoke: finit_module %s failed\n", path);
		finish(path);
	}
	close(fd);
}

static int wl_new(int wl, __u32 type, __u32 size)
{
	struct virtwl_ioctl_new n = { .type = type, .fd = -1, .size = size };

	if (ioctl(wl, VIRTWL_IOCTL_NEW, &n) != 0)
		return -1;
	return n.fd;
}

int main(void)
{
	static const char *mods[] = {
		"/lib/virtio_ring.ko", "/lib/virtio.ko", "/lib/virtio_pci_modern_dev.ko",
		"/lib/virtio_pci_legacy_dev.ko", "/lib/virtio_pci.ko", "/lib/virtio_wl.ko",
	};
	struct {
		struct virtwl_ioctl_txn txn;
		char data[4096];
	} msg;
	char buf[64];
	int wl, ctx, shm, pipe_r, i;
	char *shm_map, *host_map;

	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	setvbuf(stdout, NULL, _IONBF, 0);
	for (i = 0; i < 6; i++)
		load(mods[i]);
	wl = open("/dev/wl0", O_RDWR | O_CLOEXEC);
	CHECK(wl >= 0, "open /dev/wl0");

	CHECK(wl_new(wl, VIRTWL_IOCTL_NEW_DMABUF, 0) < 0 && errno == ENOTTY, "dmabuf is ENOTTY");
	{
		struct virtwl_ioctl_new n = { .type = VIRTWL_IOCTL_NEW_CTX_NAMED, .fd = -1 };

		strcpy(n.name, "no-such-socket");
		CHECK(ioctl(wl, VIRTWL_IOCTL_NEW, &n) != 0 && errno == ENODEV,
		      "unknown name is ENODEV");
	}
	ctx = wl_new(wl, VIRTWL_IOCTL_NEW_CTX, 0);
	CHECK(ctx >= 0, "NEW_CTX");
	shm = wl_new(wl, VIRTWL_IOCTL_NEW_ALLOC, 5000);
	CHECK(shm >= 0, "NEW_ALLOC");
	shm_map = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, shm, 0);
	CHECK(shm_map != MAP_FAILED, "mmap shm");
	CHECK(mmap(NULL, 3 * 4096, PROT_READ, MAP_SHARED, shm, 0) == MAP_FAILED && errno == EINVAL,
	      "mmap beyond the size is EINVAL");
	strcpy(shm_map, "guest-shm-data");
	pipe_r = wl_new(wl, VIRTWL_IOCTL_NEW_PIPE_READ, 0);
	CHECK(pipe_r >= 0, "NEW_PIPE_READ");

	memset(&msg, 0, sizeof(msg));
	for (i = 0; i < VIRTWL_SEND_MAX_ALLOCS; i++)
		msg.txn.fds[i] = -1;
	msg.txn.fds[0] = shm;
	msg.txn.fds[1] = pipe_r;
	strcpy((char *)msg.txn.data, "hello from guest");
	msg.txn.len = strlen("hello from guest");
	CHECK(ioctl(ctx, VIRTWL_IOCTL_SEND, &msg) == 0, "SEND");
	printf("wl-smoke: sent\n");

	memset(&msg, 0, sizeof(msg));
	msg.txn.len = sizeof(msg.data);
	CHECK(ioctl(ctx, VIRTWL_IOCTL_RECV, &msg) == 0, "RECV");
	printf("wl-smoke: received %u bytes, fds %d %d\n", msg.txn.len, msg.txn.fds[0],
	       msg.txn.fds[1]);
	CHECK(msg.txn.len == strlen("hello from host") &&
	      !memcmp(msg.txn.data, "hello from host", msg.txn.len), "RECV data");
	CHECK(msg.txn.fds[0] >= 0 && msg.txn.fds[1] == -1, "RECV one fd");
	host_map = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, msg.txn.fds[0], 0);
	CHECK(host_map != MAP_FAILED, "mmap host memfd");
	CHECK(!strcmp(host_map, "host-memfd"), "host memfd contents");
	CHECK(!strcmp(shm_map + 100, "host-was-here"), "host write visible in guest shm");
	strcpy(host_map + 200, "guest-wrote-host-memfd");

	/* The pipe: data, then EOF after the host closed its end. */
	memset(buf, 0, sizeof(buf));
	CHECK(read(pipe_r, buf, sizeof(buf)) == 9 && !memcmp(buf, "pipe-data", 9), "pipe read");
	CHECK(read(pipe_r, buf, sizeof(buf)) == 0, "pipe EOF");
	{
		struct pollfd p = { .fd = pipe_r, .events = POLLIN };

		CHECK(poll(&p, 1, 0) == 1 && (p.revents & POLLHUP), "pipe POLLHUP");
	}
	/* Tell the host we are done; it checks our write into its memfd. */
	CHECK(write(ctx, "done", 4) == 4, "write on ctx");
	memset(buf, 0, sizeof(buf));
	CHECK(read(ctx, buf, sizeof(buf)) == 2 && !memcmp(buf, "ok", 2), "final ok");
	fcntl(ctx, F_SETFL, O_NONBLOCK);
	CHECK(read(ctx, buf, sizeof(buf)) < 0 && errno == EAGAIN, "non-blocking EAGAIN");
	close(shm);
	close(pipe_r);
	close(ctx);
	finish(NULL);
	return 0;
}
