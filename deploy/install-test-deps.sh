#!/bin/sh
# System tools the tests use: tshark (reference dissector), prometheus + promtool (real server for
# the metrics tests), prometheus-alertmanager + amtool (the fleet tests), tcpreplay and iproute2 (live-capture tests in network namespaces), graphviz
# (communication-map rendering), systemd-analyze (the unit file check), chromium (the HTML report
# rendered headless).
# Installs only what is missing; uses sudo when not root.
set -e
need="$*"  # extra packages named by the caller (the Makefile asks for python3-venv when missing)
if [ -z "$need" ]; then
command -v tshark >/dev/null 2>&1 || need="$need tshark"
command -v capinfos >/dev/null 2>&1 || need="$need wireshark-common"
command -v prometheus >/dev/null 2>&1 || need="$need prometheus"
command -v promtool >/dev/null 2>&1 || need="$need prometheus"
command -v tcpreplay >/dev/null 2>&1 || need="$need tcpreplay"
command -v ip >/dev/null 2>&1 || need="$need iproute2"
command -v dot >/dev/null 2>&1 || need="$need graphviz"
command -v systemd-analyze >/dev/null 2>&1 || need="$need systemd"
command -v prometheus-alertmanager >/dev/null 2>&1 || need="$need prometheus-alertmanager"
command -v amtool >/dev/null 2>&1 || need="$need prometheus-alertmanager"
command -v editcap >/dev/null 2>&1 || need="$need wireshark-common"
command -v chromium >/dev/null 2>&1 || need="$need chromium"
fi
[ -z "$need" ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing system packages:$need" >&2
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
