#!/bin/sh
# Install clinic-voice's Asterisk configs over Debian's and run Asterisk in the foreground.
set -eu
src=/etc/clinic-asterisk
if ! ls "$src"/*.conf >/dev/null 2>&1; then
  echo "no configs in $src: mount sip_config/asterisk there (see docker-compose.yml)" >&2
  exit 1
fi
cp "$src"/*.conf /etc/asterisk/
# The repository's configs bind SIP to 127.0.0.1:5160; ASTERISK_BIND moves it.
sed -i "s|^bind=127\.0\.0\.1:5160\$|bind=${ASTERISK_BIND}|" /etc/asterisk/pjsip.conf
mkdir -p /var/lib/asterisk /var/spool/asterisk /var/log/asterisk /run/asterisk
chown -R asterisk:asterisk /var/lib/asterisk /var/spool/asterisk /var/log/asterisk /run/asterisk
exec /usr/sbin/asterisk -f -U asterisk -G asterisk -vvv
