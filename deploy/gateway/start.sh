#!/bin/sh
# Fill in the gateway's nginx configuration and run nginx in the foreground (tini is PID 1).
# COTS_GATEWAY_UPSTREAM: the API's address (default http://api:8000, the compose service);
# COTS_GATEWAY_RESOLVER: the DNS server (default: the container's, which knows the replicas).
set -eu
resolver=${COTS_GATEWAY_RESOLVER:-$(awk '/^nameserver/ { print $2; exit }' /etc/resolv.conf)}
case $resolver in
  *:*) resolver="[$resolver]" ;;  # IPv6 addresses go in brackets
esac
upstream=${COTS_GATEWAY_UPSTREAM:-http://api:8000}
mkdir -p /tmp/cots-gateway
sed -e "s|__RESOLVER__|$resolver|" -e "s|__UPSTREAM__|$upstream|" \
  /etc/cots-gateway/nginx.conf.template >/tmp/cots-gateway/nginx.conf
echo "cots gateway: :8080 -> $upstream (DNS $resolver)" >&2
exec nginx -e stderr -c /tmp/cots-gateway/nginx.conf -g 'daemon off;'
