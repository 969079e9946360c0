# Prints eth0's carrier whenever it changes, until app.sh is done (/run/net-done) or for
# about 40 minutes.
prev=
n=0
while [ $n -lt 12000 ] && [ ! -e /run/net-done ]; do
  c=$(cat /sys/class/net/eth0/carrier 2>/dev/null || echo none)
  if [ "$c" != "$prev" ]; then
    echo "eth0 carrier $c"
    prev=$c
  fi
  n=$((n + 1))
  sleep 0.2
done
