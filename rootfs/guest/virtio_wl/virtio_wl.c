// SPDX-License-Identifier: GPL-2.0
/*
 * virtio_wl guest driver for Bulkhead: /dev/wl0 and virtual file descriptors ("vfds") backed
 * by the host's virtio_wl device (ID 63). Written from the protocol facts in Bulkhead's
 * docs/virtio_wl.md; ioctl numbers and struct layouts match ChromiumOS guests.
 *
 * Queues: 0 = in (device -> driver; pre-posted 4096-byte buffers), 1 = out (driver -> device;
 * one chain per command: readable request, writable response; every command is synchronous).
 *
 * A vfd is an anon-inode file ("[virtwl_vfd]"). Shared memory vfds mmap the device's pages
 * (absolute PFNs: USE_SHMEM is never negotiated). Socket and pipe vfds queue the in-queue
 * RECV buffers that carry their data until userspace consumed ids and data; then the buffer
 * goes back to the device.
 */

#include <linux/anon_inodes.h>
#include <linux/completion.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/kref.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/poll.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/vmalloc.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

#include <linux/virtio_wl.h>
#include <linux/virtwl.h>

#define VIRTWL_MAX_SEND_DATA (1 << 20)

/*
 * Kernel API differences this driver spans (built against 6.1 and 6.12 headers):
 * - 6.3 made vma->vm_flags read-only; vm_flags_set() changes it (and takes the VMA lock
 *   assertion into account).
 * - 6.12 removed no_llseek; a NULL .llseek means the same (lseek gives ESPIPE).
 * - 6.11 replaced virtio_find_vqs()'s callbacks[] and names[] arrays with one array of
 *   struct virtqueue_info.
 */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 12, 0)
#define VIRTWL_NO_LLSEEK NULL
#else
#define VIRTWL_NO_LLSEEK no_llseek
#endif

struct virtwl_info {
	struct kref ref;
	struct virtio_device *vdev;
	struct virtqueue *vqs[VIRTWL_QUEUE_COUNT];
	struct mutex vq_locks[VIRTWL_QUEUE_COUNT];
	struct work_struct in_work;
	struct work_struct out_work;
	/* The lost-interrupt sweep (see virtwl_sweep), per queue. */
	struct delayed_work sweep;
	unsigned long taken[VIRTWL_QUEUE_COUNT];	/* used buffers the works took */
	unsigned long taken_seen[VIRTWL_QUEUE_COUNT];	/* `taken` at the last sweep */
	bool suspect[VIRTWL_QUEUE_COUNT];	/* used buffers waiting at the last sweep */
	unsigned long lost[VIRTWL_QUEUE_COUNT];	/* interrupts found lost */
	wait_queue_head_t out_waitq;
	void **in_bufs;
	unsigned int in_buf_count;
	struct mutex vfds_lock;
	struct idr vfds;
	struct miscdevice misc;
	int index;
	bool removed;
};

/* One RECV buffer queued on a vfd until consumed. */
struct virtwl_qentry {
	struct list_head list;
	struct virtio_wl_ctrl_vfd_recv *msg;
	u32 len;		/* bytes the device wrote */
	u32 ids_taken;		/* vfd ids handed out so far */
	u32 data_off;		/* data bytes consumed so far */
};

/*
 * Locking: `lock` (a mutex) serialises the consumers of a vfd (RECV, read) and may be held
 * while taking vi->vfds_lock; `qlock` (a spinlock, innermost) protects `in_queue` and
 * `hungup`, which the in-queue work updates while holding vi->vfds_lock. So the order is
 * vfd->lock -> vi->vfds_lock -> vfd->qlock, and the in-queue work never takes vfd->lock.
 */
struct virtwl_vfd {
	struct virtwl_info *vi;
	struct mutex lock;
	spinlock_t qlock;
	u32 id;
	u32 flags;
	u64 pfn;
	u32 size;
	bool hungup;
	bool has_file;
	struct list_head in_queue;
	wait_queue_head_t in_waitq;
};

static DEFINE_IDA(virtwl_ida);
static const struct file_operations virtwl_vfd_fops;

static void virtwl_info_release(struct kref *ref)
{
	struct virtwl_info *vi = container_of(ref, struct virtwl_info, ref);

	idr_destroy(&vi->vfds);
	kfree(vi);
}

static int virtwl_resp_err(u32 type)
{
	switch (type) {
	case VIRTIO_WL_RESP_OK:
	case VIRTIO_WL_RESP_VFD_NEW:
		return 0;
	case VIRTIO_WL_RESP_ERR:
		return -ENODEV;
	case VIRTIO_WL_RESP_OUT_OF_MEMORY:
		return -ENOMEM;
	case VIRTIO_WL_RESP_INVALID_ID:
		return -ENOENT;
	case VIRTIO_WL_RESP_INVALID_TYPE:
		return -EINVAL;
	case VIRTIO_WL_RESP_INVALID_FLAGS:
		return -EPERM;
	case VIRTIO_WL_RESP_INVALID_CMD:
		return -ENOTTY;
	default:
		return -EPROTO;
	}
}

/* ---- in queue ---- */

static int virtwl_post_in_buf(struct virtwl_info *vi, void *buf)
{
	struct scatterlist sg;
	int ret;

	sg_init_one(&sg, buf, VIRTWL_IN_BUFFER_SIZE);
	mutex_lock(&vi->vq_locks[VIRTWL_VQ_IN]);
	ret = virtqueue_add_inbuf(vi->vqs[VIRTWL_VQ_IN], &sg, 1, buf, GFP_KERNEL);
	if (!ret)
		virtqueue_kick(vi->vqs[VIRTWL_VQ_IN]);
	mutex_unlock(&vi->vq_locks[VIRTWL_VQ_IN]);
	if (ret)
		dev_warn(&vi->vdev->dev, "cannot re-post an in buffer: %d\n", ret);
	return ret;
}

static struct virtwl_vfd *virtwl_vfd_alloc(struct virtwl_info *vi)
{
	struct virtwl_vfd *vfd = kzalloc(sizeof(*vfd), GFP_KERNEL);

	if (!vfd)
		return NULL;
	vfd->vi = vi;
	mutex_init(&vfd->lock);
	spin_lock_init(&vfd->qlock);
	INIT_LIST_HEAD(&vfd->in_queue);
	init_waitqueue_head(&vfd->in_waitq);
	return vfd;
}

/* A host vfd announced by VFD_NEW. Returns true if the buffer can be re-posted. */
static void virtwl_host_vfd_new(struct virtwl_info *vi, void *buf, u32 len)
{
	struct virtio_wl_ctrl_vfd_new *m = buf;
	struct virtwl_vfd *vfd;
	u32 id;
	int ret;

	if (len < offsetof(struct virtio_wl_ctrl_vfd_new, size) + sizeof(m->size))
		return;
	id = le32_to_cpu(m->vfd_id);
	if (id == 0 || !(id & VFD_HOST_VFD_ID_BIT) || (id & 0x80000000)) {
		dev_warn(&vi->vdev->dev, "host vfd id %#x refused\n", id);
		return;
	}
	vfd = virtwl_vfd_alloc(vi);
	if (!vfd)
		return;
	vfd->id = id;
	vfd->flags = le32_to_cpu(m->flags);
	vfd->pfn = le64_to_cpu(m->pfn);
	vfd->size = le32_to_cpu(m->size);
	mutex_lock(&vi->vfds_lock);
	ret = idr_alloc(&vi->vfds, vfd, id, id + 1, GFP_KERNEL);
	mutex_unlock(&vi->vfds_lock);
	if (ret < 0) {
		dev_warn(&vi->vdev->dev, "host vfd id %#x in use\n", id);
		kfree(vfd);
	}
}

/* Returns true if the buffer was queued on a vfd (and must not be re-posted now). */
static bool virtwl_recv(struct virtwl_info *vi, void *buf, u32 len)
{
	struct virtio_wl_ctrl_vfd_recv *m = buf;
	struct virtwl_qentry *q;
	struct virtwl_vfd *vfd;
	u32 count;

	if (len < sizeof(*m))
		return false;
	count = le32_to_cpu(m->vfd_count);
	if (count > VIRTWL_SEND_MAX_ALLOCS || sizeof(*m) + count * 4 > len)
		return false;
	q = kzalloc(sizeof(*q), GFP_KERNEL);
	if (!q)
		return false;
	q->msg = m;
	q->len = len;
	mutex_lock(&vi->vfds_lock);
	vfd = idr_find(&vi->vfds, le32_to_cpu(m->vfd_id));
	if (vfd) {
		spin_lock(&vfd->qlock);
		list_add_tail(&q->list, &vfd->in_queue);
		spin_unlock(&vfd->qlock);
		wake_up_interruptible_all(&vfd->in_waitq);
	}
	mutex_unlock(&vi->vfds_lock);
	if (!vfd)
		kfree(q);
	return vfd != NULL;
}

static void virtwl_hup(struct virtwl_info *vi, void *buf, u32 len)
{
	struct virtio_wl_ctrl_vfd *m = buf;
	struct virtwl_vfd *vfd;

	if (len < sizeof(*m))
		return;
	mutex_lock(&vi->vfds_lock);
	vfd = idr_find(&vi->vfds, le32_to_cpu(m->vfd_id));
	if (vfd) {
		spin_lock(&vfd->qlock);
		vfd->hungup = true;
		spin_unlock(&vfd->qlock);
		wake_up_interruptible_all(&vfd->in_waitq);
	}
	mutex_unlock(&vi->vfds_lock);
}

static void virtwl_in_work(struct work_struct *work)
{
	struct virtwl_info *vi = container_of(work, struct virtwl_info, in_work);
	struct virtio_wl_ctrl_hdr *hdr;
	unsigned int len;
	bool keep;

	for (;;) {
		mutex_lock(&vi->vq_locks[VIRTWL_VQ_IN]);
		hdr = virtqueue_get_buf(vi->vqs[VIRTWL_VQ_IN], &len);
		mutex_unlock(&vi->vq_locks[VIRTWL_VQ_IN]);
		if (!hdr)
			break;
		WRITE_ONCE(vi->taken[VIRTWL_VQ_IN], vi->taken[VIRTWL_VQ_IN] + 1);
		if (len > VIRTWL_IN_BUFFER_SIZE)
			len = VIRTWL_IN_BUFFER_SIZE;
		keep = false;
		if (len >= sizeof(*hdr)) {
			switch (le32_to_cpu(hdr->type)) {
			case VIRTIO_WL_CMD_VFD_NEW:
				virtwl_host_vfd_new(vi, hdr, len);
				break;
			case VIRTIO_WL_CMD_VFD_RECV:
				keep = virtwl_recv(vi, hdr, len);
				break;
			case VIRTIO_WL_CMD_VFD_HUP:
				virtwl_hup(vi, hdr, len);
				break;
			default:
				dev_warn(&vi->vdev->dev, "unknown in-queue message %#x\n",
					 le32_to_cpu(hdr->type));
			}
		}
		if (!keep)
			virtwl_post_in_buf(vi, hdr);
	}
}

static void virtwl_in_cb(struct virtqueue *vq)
{
	struct virtwl_info *vi = vq->vdev->priv;

	schedule_work(&vi->in_work);
}

/* ---- out queue ---- */

static void virtwl_out_work(struct work_struct *work)
{
	struct virtwl_info *vi = container_of(work, struct virtwl_info, out_work);
	struct completion *done;
	unsigned int len;

	for (;;) {
		mutex_lock(&vi->vq_locks[VIRTWL_VQ_OUT]);
		done = virtqueue_get_buf(vi->vqs[VIRTWL_VQ_OUT], &len);
		mutex_unlock(&vi->vq_locks[VIRTWL_VQ_OUT]);
		if (!done)
			break;
		WRITE_ONCE(vi->taken[VIRTWL_VQ_OUT], vi->taken[VIRTWL_VQ_OUT] + 1);
		complete(done);
	}
	wake_up_interruptible_all(&vi->out_waitq);
}

static void virtwl_out_cb(struct virtqueue *vq)
{
	struct virtwl_info *vi = vq->vdev->priv;

	schedule_work(&vi->out_work);
}

static bool virtwl_out_has_room(struct virtwl_info *vi)
{
	bool room;

	mutex_lock(&vi->vq_locks[VIRTWL_VQ_OUT]);
	room = vi->vqs[VIRTWL_VQ_OUT]->num_free > 0;
	mutex_unlock(&vi->vq_locks[VIRTWL_VQ_OUT]);
	return room;
}

#define VIRTWL_ANSWER_CHECK (10 * HZ)
#define VIRTWL_ANSWER_STUCK_CHECKS 3
#define VIRTWL_SWEEP_PERIOD HZ

/*
 * Waits for a command's answer. The device answers every command (a hub verdict within
 * 10 s), so 30 s without one is a stuck device (a lost interrupt is the sweep's to find):
 * said once on the console.
 */
static void virtwl_wait_answer(struct virtwl_info *vi, struct completion *done, u32 type)
{
	unsigned int checks = 0;

	while (!wait_for_completion_timeout(done, VIRTWL_ANSWER_CHECK)) {
		if (++checks == VIRTWL_ANSWER_STUCK_CHECKS)
			dev_err(&vi->vdev->dev, "no answer to command %#x for %u s\n", type,
				VIRTWL_ANSWER_STUCK_CHECKS * VIRTWL_ANSWER_CHECK / HZ);
	}
}

/*
 * The lost-interrupt sweep, once a second. Under nested emulation a queue's interrupt can
 * go missing (the device put buffers in the used ring and signalled, and no callback ran):
 * a command's caller would then wait forever, or a message would sit unread. A queue whose
 * used buffers waited a whole period, with nothing taken meanwhile and its work neither
 * queued nor running, lost its interrupt: its work is run from here and the loss is said
 * on the console (rate-limited). A driver merely slow to take them is left alone.
 */
static void virtwl_sweep_queue(struct virtwl_info *vi, int q, struct work_struct *work)
{
	unsigned long taken = READ_ONCE(vi->taken[q]);
	bool pending;

	mutex_lock(&vi->vq_locks[q]);
	pending = !virtqueue_enable_cb(vi->vqs[q]);
	mutex_unlock(&vi->vq_locks[q]);
	if (!pending) {
		vi->suspect[q] = false;
		return;
	}
	if (vi->suspect[q] && vi->taken_seen[q] == taken && !work_busy(work)) {
		vi->lost[q]++;
		dev_err_ratelimited(&vi->vdev->dev,
				    "%s queue: used buffers without an interrupt for %u ms (lost interrupt %lu): taking them\n",
				    q == VIRTWL_VQ_IN ? "in" : "out",
				    jiffies_to_msecs(VIRTWL_SWEEP_PERIOD), vi->lost[q]);
		vi->suspect[q] = false;
		schedule_work(work);
		return;
	}
	vi->suspect[q] = true;
	vi->taken_seen[q] = taken;
}

static void virtwl_sweep(struct work_struct *work)
{
	struct virtwl_info *vi = container_of(to_delayed_work(work), struct virtwl_info, sweep);

	if (READ_ONCE(vi->removed))
		return;
	virtwl_sweep_queue(vi, VIRTWL_VQ_IN, &vi->in_work);
	virtwl_sweep_queue(vi, VIRTWL_VQ_OUT, &vi->out_work);
	schedule_delayed_work(&vi->sweep, VIRTWL_SWEEP_PERIOD);
}

/* Fills `sgl` (of `max` entries) for `len` bytes at `buf` (kmalloc'd or vmalloc'd). */
static int virtwl_fill_sg(struct scatterlist *sgl, int max, void *buf, size_t len)
{
	int n = 0;

	if (!is_vmalloc_addr(buf)) {
		sg_init_table(sgl, 1);
		sg_set_buf(sgl, buf, len);
		return 1;
	}
	sg_init_table(sgl, max);
	while (len) {
		size_t off = offset_in_page(buf);
		size_t chunk = min_t(size_t, len, PAGE_SIZE - off);

		if (n >= max)
			return -E2BIG;
		sg_set_page(&sgl[n], vmalloc_to_page(buf), chunk, off);
		buf += chunk;
		len -= chunk;
		n++;
	}
	sg_mark_end(&sgl[n - 1]);
	return n;
}

/*
 * Sends one command and waits for the device's answer in `resp` (`resp_len` bytes).
 * Returns 0 or a negative errno for transport failures; the caller maps the response code.
 */
static int virtwl_command(struct virtwl_info *vi, void *req, size_t req_len, void *resp,
			  size_t resp_len, bool nonblock)
{
	struct scatterlist *out_sg, in_sg, *sgs[2];
	DECLARE_COMPLETION_ONSTACK(done);
	int max = req_len / PAGE_SIZE + 2;
	int ret;

	out_sg = kmalloc_array(max, sizeof(*out_sg), GFP_KERNEL);
	if (!out_sg)
		return -ENOMEM;
	ret = virtwl_fill_sg(out_sg, max, req, req_len);
	if (ret < 0)
		goto out;
	sg_init_one(&in_sg, resp, resp_len);
	sgs[0] = out_sg;
	sgs[1] = &in_sg;
	for (;;) {
		mutex_lock(&vi->vq_locks[VIRTWL_VQ_OUT]);
		ret = virtqueue_add_sgs(vi->vqs[VIRTWL_VQ_OUT], sgs, 1, 1, &done, GFP_KERNEL);
		if (!ret)
			virtqueue_kick(vi->vqs[VIRTWL_VQ_OUT]);
		mutex_unlock(&vi->vq_locks[VIRTWL_VQ_OUT]);
		if (ret != -ENOSPC)
			break;
		if (nonblock) {
			ret = -EAGAIN;
			goto out;
		}
		if (!wait_event_timeout(vi->out_waitq, virtwl_out_has_room(vi), HZ)) {
			ret = -EBUSY;
			goto out;
		}
	}
	if (ret)
		goto out;
	/*
	 * Buffers the device owns must outlive the command: wait uninterruptibly. The device
	 * answers every command (a hub verdict within 10 s), so a long wait is either a stuck
	 * device or an interrupt that never came (seen under nested emulation): every 5 s the
	 * used ring is looked at directly, and each case is said once on the console.
	 */
	virtwl_wait_answer(vi, &done, le32_to_cpu(((struct virtio_wl_ctrl_hdr *)req)->type));
out:
	kfree(out_sg);
	return ret;
}

static int virtwl_close_id(struct virtwl_info *vi, u32 id)
{
	struct virtio_wl_ctrl_vfd *req;
	__le32 *resp;
	int ret;

	req = kzalloc(sizeof(*req), GFP_KERNEL);
	resp = kzalloc(sizeof(*resp) * 2, GFP_KERNEL);
	if (!req || !resp) {
		ret = -ENOMEM;
		goto out;
	}
	req->hdr.type = cpu_to_le32(VIRTIO_WL_CMD_VFD_CLOSE);
	req->vfd_id = cpu_to_le32(id);
	ret = virtwl_command(vi, req, sizeof(*req), resp, sizeof(*resp), false);
	if (!ret)
		ret = virtwl_resp_err(le32_to_cpu(*resp));
out:
	kfree(req);
	kfree(resp);
	return ret;
}

/* ---- vfds ---- */

/* Frees a vfd no file refers to: forgets its id, tells the device, returns its buffers. */
static void virtwl_vfd_destroy(struct virtwl_vfd *vfd, bool tell_device);

/* Drops host vfds a consumer will never claim (ids not yet handed out in `q`). */
static void virtwl_drop_unclaimed(struct virtwl_info *vi, struct virtwl_qentry *q)
{
	u32 count = le32_to_cpu(q->msg->vfd_count);
	__le32 *ids = (__le32 *)(q->msg + 1);
	struct virtwl_vfd *host;

	for (; q->ids_taken < count; q->ids_taken++) {
		mutex_lock(&vi->vfds_lock);
		host = idr_find(&vi->vfds, le32_to_cpu(ids[q->ids_taken]));
		if (host && host->has_file)
			host = NULL;
		if (host)
			idr_remove(&vi->vfds, host->id);
		mutex_unlock(&vi->vfds_lock);
		if (host)
			virtwl_vfd_destroy(host, true);
	}
}

static void virtwl_vfd_destroy(struct virtwl_vfd *vfd, bool tell_device)
{
	struct virtwl_info *vi = vfd->vi;
	struct virtwl_qentry *q, *tmp;

	if (tell_device && !vi->removed)
		virtwl_close_id(vi, vfd->id);
	list_for_each_entry_safe(q, tmp, &vfd->in_queue, list) {
		list_del(&q->list);
		virtwl_drop_unclaimed(vi, q);
		if (!vi->removed)
			virtwl_post_in_buf(vi, q->msg);
		else
			kfree(q->msg);
		kfree(q);
	}
	kfree(vfd);
}

static int virtwl_vfd_release(struct inode *inode, struct file *filp)
{
	struct virtwl_vfd *vfd = filp->private_data;
	struct virtwl_info *vi = vfd->vi;

	mutex_lock(&vi->vfds_lock);
	idr_remove(&vi->vfds, vfd->id);
	mutex_unlock(&vi->vfds_lock);
	virtwl_vfd_destroy(vfd, true);
	kref_put(&vi->ref, virtwl_info_release);
	return 0;
}

/* Gives `vfd` a file and an fd (O_CLOEXEC). */
static int virtwl_vfd_install(struct virtwl_vfd *vfd)
{
	int mode;
	int fd;

	if (vfd->pfn)
		mode = O_RDWR;
	else if ((vfd->flags & (VIRTIO_WL_VFD_READ | VIRTIO_WL_VFD_WRITE)) ==
		 (VIRTIO_WL_VFD_READ | VIRTIO_WL_VFD_WRITE))
		mode = O_RDWR;
	else if (vfd->flags & VIRTIO_WL_VFD_WRITE)
		mode = O_WRONLY;
	else if (vfd->flags & VIRTIO_WL_VFD_READ)
		mode = O_RDONLY;
	else
		mode = O_RDWR;
	kref_get(&vfd->vi->ref);
	vfd->has_file = true;
	fd = anon_inode_getfd("[virtwl_vfd]", &virtwl_vfd_fops, vfd, mode | O_CLOEXEC);
	if (fd < 0) {
		vfd->has_file = false;
		kref_put(&vfd->vi->ref, virtwl_info_release);
	}
	return fd;
}

static bool virtwl_has_input(struct virtwl_vfd *vfd)
{
	bool r;

	spin_lock(&vfd->qlock);
	r = !list_empty(&vfd->in_queue) || vfd->hungup;
	spin_unlock(&vfd->qlock);
	return r;
}

static struct virtwl_qentry *virtwl_first(struct virtwl_vfd *vfd)
{
	struct virtwl_qentry *q;

	spin_lock(&vfd->qlock);
	q = list_first_entry_or_null(&vfd->in_queue, struct virtwl_qentry, list);
	spin_unlock(&vfd->qlock);
	return q;
}

/* Waits for queued input (or a hang-up). Called with vfd->lock held; returns with it held. */
static int virtwl_wait_input(struct virtwl_vfd *vfd, bool nonblock)
{
	int ret;

	while (!virtwl_has_input(vfd)) {
		if (nonblock)
			return -EAGAIN;
		mutex_unlock(&vfd->lock);
		ret = wait_event_interruptible(vfd->in_waitq, virtwl_has_input(vfd));
		mutex_lock(&vfd->lock);
		if (ret)
			return ret;
	}
	return 0;
}

/*
 * Receives into `data` (user, `cap` bytes) and, if `fds` is given, up to 28 new fds.
 * Returns the bytes received (0 at EOF after a hang-up) or a negative errno.
 */
static ssize_t virtwl_vfd_recv(struct virtwl_vfd *vfd, char __user *data, size_t cap, int *fds,
			       bool nonblock)
{
	struct virtwl_info *vi = vfd->vi;
	struct virtwl_qentry *q;
	size_t done = 0;
	int nfds = 0;
	int ret;

	mutex_lock(&vfd->lock);
	ret = virtwl_wait_input(vfd, nonblock);
	if (ret)
		goto out;
	while ((q = virtwl_first(vfd))) {
		u32 count, data_len, hdr_len, n;
		__le32 *ids;

		count = le32_to_cpu(q->msg->vfd_count);
		ids = (__le32 *)(q->msg + 1);
		hdr_len = sizeof(*q->msg) + count * 4;
		data_len = q->len - hdr_len;
		if (fds) {
			while (q->ids_taken < count && nfds < VIRTWL_SEND_MAX_ALLOCS) {
				struct virtwl_vfd *host;
				int fd = -ENOENT;

				mutex_lock(&vi->vfds_lock);
				host = idr_find(&vi->vfds, le32_to_cpu(ids[q->ids_taken]));
				if (host && !host->has_file)
					fd = virtwl_vfd_install(host);
				mutex_unlock(&vi->vfds_lock);
				q->ids_taken++;
				if (fd >= 0)
					fds[nfds++] = fd;
			}
		} else {
			virtwl_drop_unclaimed(vi, q);
		}
		n = min_t(size_t, cap - done, data_len - q->data_off);
		if (n && copy_to_user(data + done, (u8 *)q->msg + hdr_len + q->data_off, n)) {
			ret = -EFAULT;
			goto out;
		}
		q->data_off += n;
		done += n;
		if (q->ids_taken == count && q->data_off == data_len) {
			spin_lock(&vfd->qlock);
			list_del(&q->list);
			spin_unlock(&vfd->qlock);
			virtwl_post_in_buf(vi, q->msg);
			kfree(q);
		} else {
			break;
		}
		/* Never merge a message carrying fds into data already returned. */
		if (done == cap || nfds)
			break;
		q = virtwl_first(vfd);
		if (q && le32_to_cpu(q->msg->vfd_count) && fds)
			break;
	}
out:
	mutex_unlock(&vfd->lock);
	if (ret)
		return ret;
	if (fds) {
		int i;

		for (i = nfds; i < VIRTWL_SEND_MAX_ALLOCS; i++)
			fds[i] = -1;
	}
	return done;
}

/* Sends `len` bytes from user `data` and the vfds behind `fds` (or none) on `vfd`. */
static int virtwl_vfd_send(struct virtwl_vfd *vfd, const char __user *data, u32 len,
			   const int *fds, bool nonblock)
{
	struct virtio_wl_ctrl_vfd_send *req;
	u32 ids[VIRTWL_SEND_MAX_ALLOCS];
	u32 count = 0;
	size_t total;
	__le32 *resp;
	int ret = 0;
	int i;

	if (len > VIRTWL_MAX_SEND_DATA)
		return -EMSGSIZE;
	for (i = 0; fds && i < VIRTWL_SEND_MAX_ALLOCS && fds[i] >= 0; i++) {
		/* fget/fput, not fdget: struct fd's layout changed in 6.12 (fd_file()). */
		struct file *f = fget(fds[i]);

		if (!f)
			return -EBADF;
		if (f->f_op != &virtwl_vfd_fops) {
			fput(f);
			return -EINVAL;
		}
		ids[count++] = ((struct virtwl_vfd *)f->private_data)->id;
		fput(f);
	}
	if (!count && !len)
		return 0;
	total = sizeof(*req) + count * 4 + len;
	req = kvzalloc(total, GFP_KERNEL);
	resp = kzalloc(8, GFP_KERNEL);
	if (!req || !resp) {
		ret = -ENOMEM;
		goto out;
	}
	req->hdr.type = cpu_to_le32(VIRTIO_WL_CMD_VFD_SEND);
	req->vfd_id = cpu_to_le32(vfd->id);
	req->vfd_count = cpu_to_le32(count);
	for (i = 0; i < count; i++)
		((__le32 *)(req + 1))[i] = cpu_to_le32(ids[i]);
	if (len && copy_from_user((u8 *)(req + 1) + count * 4, data, len)) {
		ret = -EFAULT;
		goto out;
	}
	ret = virtwl_command(vfd->vi, req, total, resp, 4, nonblock);
	if (!ret)
		ret = virtwl_resp_err(le32_to_cpu(*resp));
out:
	kvfree(req);
	kfree(resp);
	return ret;
}

static long virtwl_vfd_ioctl(struct file *filp, unsigned int cmd, unsigned long arg)
{
	struct virtwl_vfd *vfd = filp->private_data;
	struct virtwl_ioctl_txn __user *utxn = (void __user *)arg;
	bool nonblock = filp->f_flags & O_NONBLOCK;
	struct virtwl_ioctl_txn txn;
	ssize_t n;
	int ret;

	switch (cmd) {
	case VIRTWL_IOCTL_SEND:
		if (copy_from_user(&txn, utxn, sizeof(txn)))
			return -EFAULT;
		return virtwl_vfd_send(vfd, (const char __user *)utxn->data, txn.len, txn.fds,
				       nonblock);
	case VIRTWL_IOCTL_RECV:
		if (copy_from_user(&txn, utxn, sizeof(txn)))
			return -EFAULT;
		n = virtwl_vfd_recv(vfd, (char __user *)utxn->data, txn.len, txn.fds, nonblock);
		if (n < 0)
			return n;
		txn.len = n;
		if (copy_to_user(utxn, &txn, sizeof(txn))) {
			ret = -EFAULT;
			return ret;
		}
		return 0;
	case VIRTWL_IOCTL_DMABUF_SYNC:
		return -ENOTTY;
	default:
		return -ENOTTY;
	}
}

static ssize_t virtwl_vfd_read(struct file *filp, char __user *buf, size_t count, loff_t *pos)
{
	struct virtwl_vfd *vfd = filp->private_data;

	return virtwl_vfd_recv(vfd, buf, count, NULL, filp->f_flags & O_NONBLOCK);
}

static ssize_t virtwl_vfd_write(struct file *filp, const char __user *buf, size_t count,
				loff_t *pos)
{
	struct virtwl_vfd *vfd = filp->private_data;
	size_t n = min_t(size_t, count, VIRTWL_MAX_SEND_DATA);
	int ret;

	ret = virtwl_vfd_send(vfd, buf, n, NULL, filp->f_flags & O_NONBLOCK);
	return ret ? ret : n;
}

static __poll_t virtwl_vfd_poll(struct file *filp, struct poll_table_struct *wait)
{
	struct virtwl_vfd *vfd = filp->private_data;
	struct virtwl_info *vi = vfd->vi;
	__poll_t mask = 0;

	poll_wait(filp, &vfd->in_waitq, wait);
	poll_wait(filp, &vi->out_waitq, wait);
	if (virtwl_out_has_room(vi))
		mask |= EPOLLOUT | EPOLLWRNORM;
	spin_lock(&vfd->qlock);
	if (!list_empty(&vfd->in_queue))
		mask |= EPOLLIN | EPOLLRDNORM;
	if (vfd->hungup)
		mask |= EPOLLHUP;
	spin_unlock(&vfd->qlock);
	return mask;
}

static int virtwl_vfd_mmap(struct file *filp, struct vm_area_struct *vma)
{
	struct virtwl_vfd *vfd = filp->private_data;
	unsigned long len = vma->vm_end - vma->vm_start;
	u64 size = PAGE_ALIGN((u64)vfd->size);

	if (!vfd->pfn)
		return -EACCES;
	if (vma->vm_pgoff > (size >> PAGE_SHIFT) || len > size - (vma->vm_pgoff << PAGE_SHIFT))
		return -EINVAL;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_set(vma, VM_PFNMAP | VM_IO | VM_DONTEXPAND | VM_DONTDUMP);
#else
	vma->vm_flags |= VM_PFNMAP | VM_IO | VM_DONTEXPAND | VM_DONTDUMP;
#endif
	return io_remap_pfn_range(vma, vma->vm_start,
				  (vfd->pfn << VIRTWL_PFN_SHIFT >> PAGE_SHIFT) + vma->vm_pgoff,
				  len, vma->vm_page_prot);
}

static const struct file_operations virtwl_vfd_fops = {
	.owner = THIS_MODULE,
	.release = virtwl_vfd_release,
	.read = virtwl_vfd_read,
	.write = virtwl_vfd_write,
	.poll = virtwl_vfd_poll,
	.mmap = virtwl_vfd_mmap,
	.unlocked_ioctl = virtwl_vfd_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = VIRTWL_NO_LLSEEK,
};

/* ---- /dev/wl0 ---- */

static long virtwl_ioctl_new(struct virtwl_info *vi, struct virtwl_ioctl_new __user *uarg,
			     unsigned int size)
{
	struct virtio_wl_ctrl_vfd_new *req, *resp;
	struct virtwl_ioctl_new args = {};
	struct virtwl_vfd *vfd;
	u32 type, wire;
	int id, fd, ret;

	if (size < offsetof(struct virtwl_ioctl_new, size) || size > sizeof(args))
		return -EINVAL;
	if (copy_from_user(&args, uarg, size))
		return -EFAULT;
	switch (args.type) {
	case VIRTWL_IOCTL_NEW_CTX:
		wire = VIRTIO_WL_CMD_VFD_NEW_CTX;
		break;
	case VIRTWL_IOCTL_NEW_CTX_NAMED:
		wire = VIRTIO_WL_CMD_VFD_NEW_CTX_NAMED;
		break;
	case VIRTWL_IOCTL_NEW_ALLOC:
		wire = VIRTIO_WL_CMD_VFD_NEW;
		break;
	case VIRTWL_IOCTL_NEW_PIPE_READ:
	case VIRTWL_IOCTL_NEW_PIPE_WRITE:
		wire = VIRTIO_WL_CMD_VFD_NEW_PIPE;
		break;
	default:
		/* dmabufs need a GPU this driver does not know about. */
		return -ENOTTY;
	}
	type = args.type;

	vfd = virtwl_vfd_alloc(vi);
	req = kzalloc(sizeof(*req), GFP_KERNEL);
	resp = kzalloc(sizeof(*resp), GFP_KERNEL);
	if (!vfd || !req || !resp) {
		ret = -ENOMEM;
		goto free;
	}
	/* Reserve the id first: the device may queue data for it before we see the answer. */
	mutex_lock(&vi->vfds_lock);
	id = idr_alloc(&vi->vfds, vfd, 1, VIRTWL_MAX_ALLOC, GFP_KERNEL);
	mutex_unlock(&vi->vfds_lock);
	if (id < 0) {
		ret = id;
		goto free;
	}
	vfd->id = id;
	req->hdr.type = cpu_to_le32(wire);
	req->vfd_id = cpu_to_le32(id);
	switch (type) {
	case VIRTWL_IOCTL_NEW_CTX:
		req->flags = cpu_to_le32(VIRTIO_WL_VFD_READ | VIRTIO_WL_VFD_WRITE);
		break;
	case VIRTWL_IOCTL_NEW_CTX_NAMED:
		memcpy(req->name, args.name, sizeof(req->name));
		break;
	case VIRTWL_IOCTL_NEW_ALLOC:
		if (!args.size || args.size > U32_MAX - PAGE_SIZE) {
			ret = -EINVAL;
			goto unreserve;
		}
		req->size = cpu_to_le32(PAGE_ALIGN(args.size));
		break;
	case VIRTWL_IOCTL_NEW_PIPE_READ:
		req->flags = cpu_to_le32(VIRTIO_WL_VFD_READ);
		break;
	case VIRTWL_IOCTL_NEW_PIPE_WRITE:
		req->flags = cpu_to_le32(VIRTIO_WL_VFD_WRITE);
		break;
	}
	ret = virtwl_command(vi, req, sizeof(*req), resp, sizeof(*resp), false);
	if (!ret)
		ret = virtwl_resp_err(le32_to_cpu(resp->hdr.type));
	if (!ret && le32_to_cpu(resp->hdr.type) != VIRTIO_WL_RESP_VFD_NEW)
		ret = -EPROTO;
	if (ret)
		goto unreserve;
	vfd->flags = le32_to_cpu(resp->flags);
	vfd->pfn = le64_to_cpu(resp->pfn);
	vfd->size = le32_to_cpu(resp->size);
	/*
	 * A pipe keeps the direction that was asked for, whatever the answer's flags say (a
	 * device may answer 0; ChromiumOS's driver then makes even a write pipe O_RDONLY).
	 * See docs/virtio_wl.md, "Our driver and ChromiumOS's".
	 */
	if (wire == VIRTIO_WL_CMD_VFD_NEW_PIPE)
		vfd->flags = le32_to_cpu(req->flags);
	if (wire == VIRTIO_WL_CMD_VFD_NEW && !vfd->pfn) {
		ret = -EPROTO;
		goto close;
	}
	mutex_lock(&vi->vfds_lock);
	fd = virtwl_vfd_install(vfd);
	mutex_unlock(&vi->vfds_lock);
	if (fd < 0) {
		ret = fd;
		goto close;
	}
	kfree(req);
	kfree(resp);
	if (put_user(fd, &uarg->fd))
		return -EFAULT; /* the fd stays installed, as with any partially failed ioctl */
	return 0;

close:
	virtwl_close_id(vi, id);
unreserve:
	mutex_lock(&vi->vfds_lock);
	idr_remove(&vi->vfds, id);
	mutex_unlock(&vi->vfds_lock);
	mutex_lock(&vfd->lock);
	while (!list_empty(&vfd->in_queue)) {
		struct virtwl_qentry *q =
			list_first_entry(&vfd->in_queue, struct virtwl_qentry, list);

		list_del(&q->list);
		virtwl_post_in_buf(vi, q->msg);
		kfree(q);
	}
	mutex_unlock(&vfd->lock);
free:
	kfree(vfd);
	kfree(req);
	kfree(resp);
	return ret;
}

static long virtwl_ioctl(struct file *filp, unsigned int cmd, unsigned long arg)
{
	struct virtwl_info *vi = container_of(filp->private_data, struct virtwl_info, misc);

	if (_IOC_TYPE(cmd) != VIRTWL_IOCTL_BASE)
		return -ENOTTY;
	switch (_IOC_NR(cmd)) {
	case 0: /* VIRTWL_IOCTL_NEW, any size up to the full struct */
		return virtwl_ioctl_new(vi, (void __user *)arg, _IOC_SIZE(cmd));
	default:
		return -ENOTTY;
	}
}

static const struct file_operations virtwl_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = virtwl_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = VIRTWL_NO_LLSEEK,
};

/* ---- probe/remove ---- */

static void virtwl_free_in_bufs(struct virtwl_info *vi)
{
	unsigned int i;

	if (!vi->in_bufs)
		return;
	for (i = 0; i < vi->in_buf_count; i++)
		kfree(vi->in_bufs[i]);
	kfree(vi->in_bufs);
	vi->in_bufs = NULL;
}

static int virtwl_probe(struct virtio_device *vdev)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
	struct virtqueue_info vqs_info[VIRTWL_QUEUE_COUNT] = {
		{ .name = "in", .callback = virtwl_in_cb },
		{ .name = "out", .callback = virtwl_out_cb },
	};
#else
	vq_callback_t *callbacks[VIRTWL_QUEUE_COUNT] = { virtwl_in_cb, virtwl_out_cb };
	static const char * const names[VIRTWL_QUEUE_COUNT] = { "in", "out" };
#endif
	struct virtwl_info *vi;
	unsigned int i;
	int ret;

	vi = kzalloc(sizeof(*vi), GFP_KERNEL);
	if (!vi)
		return -ENOMEM;
	kref_init(&vi->ref);
	vi->vdev = vdev;
	vdev->priv = vi;
	for (i = 0; i < VIRTWL_QUEUE_COUNT; i++)
		mutex_init(&vi->vq_locks[i]);
	INIT_WORK(&vi->in_work, virtwl_in_work);
	INIT_WORK(&vi->out_work, virtwl_out_work);
	INIT_DELAYED_WORK(&vi->sweep, virtwl_sweep);
	init_waitqueue_head(&vi->out_waitq);
	mutex_init(&vi->vfds_lock);
	idr_init(&vi->vfds);

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
	ret = virtio_find_vqs(vdev, VIRTWL_QUEUE_COUNT, vi->vqs, vqs_info, NULL);
#else
	ret = virtio_find_vqs(vdev, VIRTWL_QUEUE_COUNT, vi->vqs, callbacks, names, NULL);
#endif
	if (ret)
		goto err_free;

	vi->in_buf_count = virtqueue_get_vring_size(vi->vqs[VIRTWL_VQ_IN]);
	vi->in_bufs = kcalloc(vi->in_buf_count, sizeof(void *), GFP_KERNEL);
	if (!vi->in_bufs) {
		ret = -ENOMEM;
		goto err_vqs;
	}
	for (i = 0; i < vi->in_buf_count; i++) {
		vi->in_bufs[i] = kmalloc(VIRTWL_IN_BUFFER_SIZE, GFP_KERNEL);
		if (!vi->in_bufs[i]) {
			ret = -ENOMEM;
			goto err_bufs;
		}
	}

	vi->index = ida_alloc(&virtwl_ida, GFP_KERNEL);
	if (vi->index < 0) {
		ret = vi->index;
		goto err_bufs;
	}
	vi->misc.minor = MISC_DYNAMIC_MINOR;
	vi->misc.name = kasprintf(GFP_KERNEL, "wl%d", vi->index);
	vi->misc.fops = &virtwl_fops;
	vi->misc.mode = 0666;
	if (!vi->misc.name) {
		ret = -ENOMEM;
		goto err_ida;
	}

	virtio_device_ready(vdev);
	for (i = 0; i < vi->in_buf_count; i++) {
		struct scatterlist sg;

		sg_init_one(&sg, vi->in_bufs[i], VIRTWL_IN_BUFFER_SIZE);
		ret = virtqueue_add_inbuf(vi->vqs[VIRTWL_VQ_IN], &sg, 1, vi->in_bufs[i],
					  GFP_KERNEL);
		if (ret)
			goto err_reset;
	}
	virtqueue_kick(vi->vqs[VIRTWL_VQ_IN]);

	ret = misc_register(&vi->misc);
	if (ret)
		goto err_reset;
	dev_info(&vdev->dev, "/dev/%s ready (%u in buffers)\n", vi->misc.name,
		 vi->in_buf_count);
	schedule_delayed_work(&vi->sweep, VIRTWL_SWEEP_PERIOD);
	return 0;

err_reset:
	virtio_reset_device(vdev);
	kfree(vi->misc.name);
err_ida:
	ida_free(&virtwl_ida, vi->index);
err_bufs:
	virtwl_free_in_bufs(vi);
err_vqs:
	vdev->config->del_vqs(vdev);
err_free:
	kfree(vi);
	return ret;
}

static void virtwl_remove(struct virtio_device *vdev)
{
	struct virtwl_info *vi = vdev->priv;
	struct virtwl_vfd *vfd;
	int id;

	misc_deregister(&vi->misc);
	WRITE_ONCE(vi->removed, true);
	cancel_delayed_work_sync(&vi->sweep);
	virtio_reset_device(vdev);
	cancel_work_sync(&vi->in_work);
	cancel_work_sync(&vi->out_work);
	/* Host vfds without a file are ours to free; vfds with files go with their files. */
	mutex_lock(&vi->vfds_lock);
	idr_for_each_entry(&vi->vfds, vfd, id) {
		if (!vfd->has_file) {
			idr_remove(&vi->vfds, id);
			kfree(vfd);
		} else {
			spin_lock(&vfd->qlock);
			vfd->hungup = true;
			spin_unlock(&vfd->qlock);
			wake_up_interruptible_all(&vfd->in_waitq);
		}
	}
	mutex_unlock(&vi->vfds_lock);
	vdev->config->del_vqs(vdev);
	/*
	 * In buffers still queued on open vfds are freed when those close (removed == true);
	 * the rest are freed here.
	 */
	kfree(vi->in_bufs);
	vi->in_bufs = NULL;
	ida_free(&virtwl_ida, vi->index);
	kfree(vi->misc.name);
	kref_put(&vi->ref, virtwl_info_release);
}

static const struct virtio_device_id id_table[] = {
	{ VIRTIO_ID_WL, VIRTIO_DEV_ANY_ID },
	{ 0 },
};

static unsigned int features[] = {
	VIRTIO_WL_F_TRANS_FLAGS,
};

static struct virtio_driver virtio_wl_driver = {
	.driver.name = KBUILD_MODNAME,
	.driver.owner = THIS_MODULE,
	.id_table = id_table,
	.feature_table = features,
	.feature_table_size = ARRAY_SIZE(features),
	.feature_table_legacy = features,
	.feature_table_size_legacy = ARRAY_SIZE(features),
	.probe = virtwl_probe,
	.remove = virtwl_remove,
};

module_virtio_driver(virtio_wl_driver);
MODULE_DEVICE_TABLE(virtio, id_table);
MODULE_DESCRIPTION("virtio_wl guest driver (Bulkhead)");
MODULE_LICENSE("GPL");
