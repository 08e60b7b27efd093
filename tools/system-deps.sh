#!/usr/bin/env bash
# Debian packages the test suite needs beyond the venv: mosquitto (the real MQTT broker the MQTT
# sink and `citynode receive` end-to-end tests start on a free port) and PostgreSQL 15 (the
# server tests/pg_server.py starts in a temp dir on a free port, for host_tools/receive/pg.py). Run by
# `make test`.
#
# Idempotent and quiet: installs only what is missing, with apt-get, and only as root; prints one
# line saying what it did. Without root or apt-get it installs nothing and exits 0: the tests
# that need the package then skip and say why. As root, a failed install exits 1.
set -u

PACKAGES=(mosquitto postgresql-15 postgresql-client-15)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "system-deps: present: ${PACKAGES[*]}"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: missing ${missing[*]}; no apt-get here: install by hand (tests needing it skip)"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "system-deps: missing ${missing[*]}; not root: 'sudo apt-get install ${missing[*]}'" \
        "(tests needing it skip)"
    exit 0
fi

log=$(mktemp)
# A package's maintainer scripts must not start a system-wide broker on port 1883, nor a
# PostgreSQL on 5432: tests start their own. policy-rc.d answering 101 ("action forbidden") is
# Debian's switch for that.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
fi
# postgresql-common also creates a cluster "15/main" when postgresql-15 is first installed
# (configure_version in /usr/share/postgresql-common/maintscripts-functions); not started, by
# the policy above, but it would start at the next boot. One this run made is dropped below;
# one that was there before is left alone. No test uses either.
pg_main=/etc/postgresql/15/main
had_pg_main=0
if [ -e "$pg_main" ]; then
    had_pg_main=1
fi
export DEBIAN_FRONTEND=noninteractive
install() {
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$log" 2>&1
}
status=0
if ! install; then
    # A fresh machine may have no package lists yet.
    apt-get update -qq >>"$log" 2>&1 && install || status=1
fi
if [ "$made_policy" = 1 ]; then
    rm -f "$policy"
fi
if [ "$status" != 0 ]; then
    echo "system-deps: apt-get install ${missing[*]} failed:"
    tail -n 20 "$log"
    rm -f "$log"
    exit 1
fi
note=""
if [ "$had_pg_main" = 0 ] && [ -e "$pg_main" ]; then
    if pg_dropcluster --stop 15 main >>"$log" 2>&1; then
        note=" (dropped the cluster 15/main Debian made: tests start their own)"
    else
        note=" (could not drop the cluster 15/main Debian made: $(tail -n 1 "$log"))"
    fi
fi
rm -f "$log"
echo "system-deps: installed ${missing[*]}$note"
