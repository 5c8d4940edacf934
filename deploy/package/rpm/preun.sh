# toa's %preun. Erasing ($1 = 0) stops the service and unloads for good (also when keep_loaded
# = true left it loaded), from the places /etc/toa/toa.toml names. An upgrade stops nothing.
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        # Two commands, not `disable --now`: CentOS 7's systemd 219 predates --now.
        systemctl stop toa.service || :
        systemctl disable toa.service >/dev/null 2>&1 || :
    fi
    if [ -f /etc/toa/toa.toml ]; then
        /usr/bin/toa unload --config /etc/toa/toa.toml || exit 1
    else
        /usr/bin/toa unload || exit 1
    fi
fi
