# app-vm of the net VM example: configure eth0 (static: the peer's network has no DHCP
# server), wait for the link, ping the peer, fetch its page, be measured. $1 is
# bulkhead-netprobe. Every loop is bounded.
#
# virtio_net's TX NAPI is turned off (`ethtool -C eth0 tx-frames 0`, allowed only while the
# interface is down): the driver then frees each sent frame at once instead of when the
# device has completed it, so TCP's small-queue limit (about two TSO frames below the socket
# until they are freed) no longer waits for the round trip to the VMM's worker thread. The
# benchmark measures the app VM both ways (docs/net.md, Measured).
probe=$1
peer=198.51.100.1
napi() {
  ip link set eth0 down
  ethtool -C eth0 tx-frames "$1" || echo "ethtool -C eth0 tx-frames $1 failed"
  ip link set eth0 up
  echo "TX NAPI: $(ethtool -c eth0 | busybox grep -m1 tx-frames:)"
}
napi 0
ip addr add 198.51.100.10/24 dev eth0
# Up to 120 s for the link, by the clock.
if ! $probe carrier eth0 --timeout 120; then
  echo "is app-vm granted connect net@net-vm?"
  exit 1
fi
echo "eth0 is up: $(ip -brief address show eth0)"
busybox ping -c 3 -W 5 $peer | busybox grep -E "transmitted|round-trip"
if page=$($probe fetch --timeout 10 http://$peer/page 2>/dev/null); then
  echo "fetched: $page"
else
  echo "fetch failed"
fi
# Three rounds, each after net-vm's own measurement of the round before (the peer takes
# them in order: app-1, net-vm-1, app-2, …).
for round in 1 2 3; do
  $probe measure $peer:9000 --label app-$round --seconds 10
done
# For comparison, after net-vm's last measurement: the same with the driver's default, TX
# NAPI on.
napi 1
$probe carrier eth0 --timeout 120 && $probe measure $peer:9000 --label app-napi-tx --seconds 10
