# app-vm of the net VM example: configure eth0 (static: the peer's network has no DHCP
# server), wait for the link, ping the peer, fetch its page, be measured. $1 is
# bulkhead-netprobe. Every loop is bounded.
probe=$1
peer=198.51.100.1
ip link set eth0 up
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
$probe measure $peer:9000 --label app --seconds 10
