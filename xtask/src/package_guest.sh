#!/bin/sh
# The .deb check inside the Debian 12 guest (xtask/src/package_check.rs runs it as a unit):
# install, upgrade with an open connection, purge, as an operator would.
fact() { echo "TOA-FACT $1 $2"; }
wait_for() { i=0; while ! sh -c "$1" >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 1200 ] && return 1; sleep 0.1; done; }
ready() { wait_for 'wget -qO- http://127.0.0.1:9431/readyz'; }
state() { systemctl is-active toa.service; }
pinned() { if [ -e /sys/fs/bpf/toa ]; then echo yes; else echo no; fi; }
# One line over the connection that stays open throughout; prints the server's answer.
ask() {
    n=$(wc -l < /tmp/probe.out)
    echo "$1" >&3
    wait_for "[ \$(wc -l < /tmp/probe.out) -gt $n ]"
    tail -n 1 /tmp/probe.out
}
export LANG=C
echo TOA-PKG-BEGIN

dpkg -i /root/toa-first.deb </dev/null; fact install_rc $?
fact installed_active "$(state)"
fact installed_enabled "$(systemctl is-enabled toa.service)"
fact installed_pinned "$(pinned)"
fact man_toa "$(man toa | grep -c 'Real client addresses')"
fact man_toa_load "$(man -w toa-load)"
fact man_toa_load_name "$(man toa-load | grep -A1 '^NAME' | tail -n 1 | awk '{print $1}')"
fact bash_completion "$(bash -c '. /usr/share/bash-completion/bash_completion; _completion_loader toa; COMP_WORDS=(toa unl); COMP_CWORD=1; COMP_LINE="toa unl"; COMP_POINT=7; _toa toa unl toa; echo "${COMPREPLY[*]}"')"

systemctl enable --now toa.service; fact enable_rc $?
ready; fact ready_rc $?
fact active "$(state)"
fact metrics "$(wget -qO- http://127.0.0.1:9431/metrics | grep '^toa_loaded ')"
/usr/local/bin/peer_echo 127.0.0.1:8080 > /tmp/echo.log 2>&1 &
wait_for 'grep -q listening /tmp/echo.log'
mkfifo /tmp/probe.in
toa probe 127.0.0.1:8080 --as 198.18.0.7:4321 --stdin < /tmp/probe.in > /tmp/probe.out 2> /tmp/probe.err &
exec 3> /tmp/probe.in
fact before_upgrade "$(ask one)"

pid=$(systemctl show -p MainPID --value toa.service)
echo "# the operator's edit" >> /etc/toa/toa.toml
dpkg -i /root/toa-second.deb </dev/null; fact upgrade_rc $?
ready
fact upgrade_version "$(dpkg-query -W -f '${Version}' toa)"
fact upgrade_active "$(state)"
fact upgrade_restarted "$([ "$(systemctl show -p MainPID --value toa.service)" != "$pid" ] && echo yes || echo no)"
fact upgrade_kept_loaded "$(journalctl -u toa.service -o cat | grep -c 'stays loaded for the next start (a package upgrade is restarting toa)')"
fact upgrade_marker "$([ -e /run/toa/keep-loaded ] && echo present || echo absent)"
fact conffile_kept "$(grep -c "the operator's edit" /etc/toa/toa.toml)"
fact after_upgrade "$(ask two)"

dpkg -i /root/toa-second.deb </dev/null; fact reinstall_rc $?
ready
fact after_reinstall "$(ask three)"

# The userspace mode's drop-in, turned on as the README says.
mkdir -p /etc/systemd/system/toa.service.d
ln -s /usr/share/toa/userspace.conf /etc/systemd/system/toa.service.d/
systemctl daemon-reload
systemctl restart toa.service
ready
fact userspace_mode "$(journalctl -u toa.service -o cat | grep -c 'toa loaded (userspace mode)')"
fact userspace_table "$([ -e /run/toa/table ] && echo present || echo absent)"

echo 'keep_loaded = true' >> /etc/toa/toa.toml
systemctl reload toa.service
wait_for "journalctl -u toa.service -o cat | grep -q 'configuration reloaded'"
dpkg --purge toa </dev/null; fact purge_rc $?
fact purge_stop_kept_loaded "$(journalctl -u toa.service -o cat | grep -c 'stays loaded for the next start (keep_loaded)')"
fact purged_active "$(state)"
fact purged_pinned "$(pinned)"
fact purged_files "$(ls -d /etc/toa /usr/bin/toa /usr/lib/toa /lib/systemd/system/toa.service /run/toa /etc/systemd/system/toa.service.d 2>/dev/null | wc -l)"
fact purged_reader "$(grep -l userspace-reade[r] /proc/[0-9]*/cmdline 2>/dev/null | wc -l)"
fact after_purge "$(ask four)"
dpkg --purge toa </dev/null; fact purge_again_rc $?
echo TOA-PKG-END
systemctl poweroff --force
