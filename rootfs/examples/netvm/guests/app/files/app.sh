# app-vm of the net VM example: configure eth0 (static: the peer's network has no DHCP
# server), wait for the link, ping the peer, fetch its page, be measured. $1 is
# bulkhead-netprobe. Every loop is bounded.
probe=$1
peer=198.51.100.1
ip link set eth0 up
ip addr add 198.51.100.10/24 dev eth0
i=0
while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ]; do
  i=$((i + 1))
  if [ $i -ge 600 ]; then
    echo "no carrier after 120 s (is app-vm granted connect net@net-vm?)"
    exit 1
  fi
  sleep 0.2
done
echo "eth0 is up: $(ip -brief address show eth0)"
busybox ping -c 3 -W 5 $peer | busybox grep -E "transmitted|round-trip"
if page=$($probe fetch --timeout 10 http://$peer/page 2>/dev/null); then
  echo "fetched: $page"
else
  echo "fetch failed"
fi
$probe measure $peer:9000 --label app --seconds 10
