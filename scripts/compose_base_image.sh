#!/usr/bin/env bash
# Build the base image of the docker-compose cluster without any container registry:
# debootstrap a minimal Debian (the host's release) with Python 3 (venv) and the packages the
# Dockerfile needs (ISA-L, etcd), then `docker import` it.
#
#   scripts/compose_base_image.sh          build kvtier-base:<release> unless it exists
#   scripts/compose_base_image.sh --force  rebuild it
#
# Prints the image name on its last line. Then:
#   BASE_IMAGE=kvtier-base:bookworm docker compose up --build --wait
# Needs root (debootstrap, chroot), debootstrap and a running Docker engine. The mirror is the
# host's (KVTIER_DEBIAN_MIRROR overrides it); the image's apt uses the same one.
set -euo pipefail

release=$(. /etc/os-release && echo "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}")
image="kvtier-base:${release}"
# Everything the Dockerfile installs with apt, so that building on this base needs no apt.
packages=python3,python3-venv,libisal2,etcd-server,etcd-client,ca-certificates

if [ "${1:-}" != --force ] && docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "compose_base_image.sh: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "compose_base_image.sh: apt-get install debootstrap" >&2; exit 1; }

mirror=${KVTIER_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then  # the host's own Debian mirror (deb822 sources or sources.list)
  mirror=$(grep -hoE '^(URIs:|deb) +[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources \
    /etc/apt/sources.list 2>/dev/null | head -n1 | awk '{print $2}' || true)
  mirror=${mirror:-http://deb.debian.org/debian}
fi
mirror=${mirror%/}
security=${mirror%/debian}/debian-security

root=$(mktemp -d /tmp/kvtier-base.XXXXXX)
cleanup() {
  umount "$root/proc" 2>/dev/null || true
  rm -rf "$root"
}
trap cleanup EXIT

echo "debootstrap $release from $mirror into $root" >&2
debootstrap --variant=minbase --include="$packages" "$release" "$root" "$mirror" >&2

# Like Debian's own container images: no services start in image builds, no docs, no apt lists.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $release main
deb $mirror $release-updates main
deb $security $release-security main
EOF
# The CAs this host added to its trust store (a TLS-inspecting egress proxy's, a company's):
# pip in the image build reaches PyPI through the same network.
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >&2
fi
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
  "$root"/var/cache/apt/*.bin "$root"/var/log/*.log

tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' - "$image" >&2
echo "$image"
