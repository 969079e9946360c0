# An app VM of tests/systems/net: its address and role come from the kernel command line
# (bulkhead.ip=, bulkhead.role=); $1 is bulkhead-netprobe. Every loop is bounded.
probe=$1
peer=198.51.100.1
for w in $(cat /proc/cmdline); do
  case $w in
    bulkhead.ip=*) addr=${w#bulkhead.ip=} ;;
    bulkhead.role=*) role=${w#bulkhead.role=} ;;
  esac
done
ip link set eth0 up
ip addr add "$addr" dev eth0
echo "eth0 is $addr ($(cat /sys/class/net/eth0/address)), role $role"
# Up to 120 s for a carrier (30 s for the VM without a grant, which waits for none), by the
# clock: a shell loop counting polls took 70 s and more for its "30 s" under nested
# emulation, longer the more loaded the machine. Prints "eth0 carrier after …" or
# "no carrier after N s (…)".
limit=120
[ "$role" = nogrant ] && limit=30
$probe carrier eth0 --timeout $limit
case $role in
  app)
    busybox ping -c 3 -W 5 $peer | busybox grep -E "transmitted|round-trip"
    # Fetch the page every 2 s; print each change between working and failing.
    state=
    n=0
    while [ $n -lt 900 ]; do
      if page=$($probe fetch --timeout 5 http://$peer/page 2>/dev/null); then
        [ "$state" = ok ] || echo "fetched: $page"
        state=ok
      else
        [ "$state" = failing ] || echo "fetch failed"
        state=failing
      fi
      n=$((n + 1))
      sleep 2
    done
    ;;
  flood)
    # Fault injection: rounds of malformed and forged frames until the peer says stop.
    n=0
    while [ $n -lt 60 ]; do
      $probe flood --iface eth0 --seconds 5
      n=$((n + 1))
      r=$($probe fetch --timeout 5 http://$peer/flood 2>/dev/null)
      [ "$r" = stop ] && break
    done
    echo "flood over after $n rounds"
    touch /run/net-done
    ;;
  nogrant)
    if busybox ping -c 3 -W 2 $peer >/dev/null 2>&1; then echo "ping answered"; else echo "ping unanswered"; fi
    if $probe fetch --timeout 5 http://$peer/page >/dev/null 2>&1; then echo "fetch worked"; else echo "fetch failed"; fi
    touch /run/net-done
    ;;
  measure)
    busybox ping -c 3 -W 5 $peer | busybox grep -E "transmitted|round-trip"
    if page=$($probe fetch --timeout 10 http://$peer/page 2>/dev/null); then echo "fetched: $page"; else echo "fetch failed"; fi
    $probe measure $peer:9000 --label app --seconds 10
    touch /run/net-done
    ;;
esac
