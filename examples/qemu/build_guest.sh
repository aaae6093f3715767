#!/usr/bin/env bash
# Build a tiny Linux guest for QEMU migration tests: a Debian kernel (vmlinuz) and a busybox initramfs (initrd.gz).
#
# Usage: examples/qemu/build_guest.sh [OUTDIR]        (default OUTDIR: examples/qemu/build)
#
# Nothing is downloaded except Debian packages through apt:
#   * qemu-system-x86, busybox-static and cpio are installed on the host if missing (needs root);
#   * the kernel package is fetched with `apt-get download` and unpacked with `dpkg-deb -x` into a temporary
#     directory (it is NOT installed on the host); only its vmlinuz is kept, as OUTDIR/vmlinuz.
# The kernel comes from the metapackage named by $KERNEL_META (default linux-image-cloud-amd64: the smallest Debian
# amd64 kernel, made for virtual machines; linux-image-amd64 works too). OUTDIR/vmlinuz is reused if present
# (delete it to fetch again); the initramfs is rebuilt on every run (it takes a second).
#
# The guest's /init (see write_init below) mounts proc/sys/dev and a tmpfs, fills /tmpfs/data with
# vmmig_data_mb MiB (default 32) of random bytes and records its md5, then prints once a second to /dev/ttyS0
#     HEARTBEAT <n> <uptime>
# with n = 1, 2, 3, ... and, every third heartbeat, re-checksums the data file and prints
#     DATA OK <n>     or     DATA BAD <n>
# If the kernel command line has vmmig_write_mb=N (N > 0), a background loop rewrites a separate N MiB file
# /tmpfs/scratch from /dev/urandom once a second (about N MB/s of dirtied guest memory; /tmpfs/data is untouched).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
outdir=${1:-$here/build}
kernel_meta=${KERNEL_META:-linux-image-cloud-amd64}
lock=/tmp/vmmig-apt.lock

log() { printf 'build_guest: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

apt_locked() {
    # Serialise apt with other scripts of this project that may install at the same time.
    flock "$lock" env DEBIAN_FRONTEND=noninteractive "$@"
}

apt_updated=0
apt_update_once() {
    if [[ $apt_updated == 0 ]]; then
        log "apt-get update"
        apt_locked apt-get update -qq
        apt_updated=1
    fi
}

ensure_host_packages() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    if [[ ! -x /bin/busybox ]] || ! file_is_static /bin/busybox; then missing+=(busybox-static); fi
    command -v cpio >/dev/null || missing+=(cpio)
    command -v gzip >/dev/null || missing+=(gzip)
    if ((${#missing[@]})); then
        [[ $(id -u) == 0 ]] || die "missing packages ${missing[*]} (run as root or install them)"
        apt_update_once
        log "apt-get install ${missing[*]}"
        apt_locked apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

file_is_static() {
    # busybox from the (dynamic) busybox package would not run in the initramfs, which has no libc.
    local out
    out=$(LC_ALL=C ldd "$1" 2>&1 || true)
    [[ $out == *"not a dynamic executable"* || $out == *"statically linked"* ]]
}

kernel_package() {
    # The versioned image package the metapackage depends on, e.g. linux-image-6.1.0-56-cloud-amd64.
    local pkg
    pkg=$(apt-cache depends "$kernel_meta" 2>/dev/null | awk '/^ *Depends: linux-image-/ {print $2; exit}' || true)
    if [[ -z $pkg ]]; then
        apt_update_once
        pkg=$(apt-cache depends "$kernel_meta" | awk '/^ *Depends: linux-image-/ {print $2; exit}')
    fi
    [[ -n $pkg ]] || die "cannot resolve the kernel package behind $kernel_meta"
    printf '%s\n' "$pkg"
}

fetch_kernel() {
    if [[ -s $outdir/vmlinuz ]]; then
        log "reusing $outdir/vmlinuz ($(cat "$outdir/kernel-package.txt" 2>/dev/null || echo unknown package))"
        return
    fi
    local pkg tmp=$scratch/kernel
    pkg=$(kernel_package)
    mkdir -p "$tmp"
    chown _apt "$tmp" 2>/dev/null || true  # apt downloads as _apt when it can write there
    log "apt-get download $pkg"
    (cd "$tmp" && apt-get download -qq "$pkg") || die "apt-get download $pkg failed"
    local deb
    deb=$(find "$tmp" -maxdepth 1 -name '*.deb' | head -n 1)
    [[ -n $deb ]] || die "no .deb downloaded for $pkg"
    dpkg-deb -x "$deb" "$tmp/root"
    local vmlinuz
    vmlinuz=$(find "$tmp/root/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n 1)
    [[ -n $vmlinuz ]] || die "$deb has no /boot/vmlinuz-*"
    install -m 0644 "$vmlinuz" "$outdir/vmlinuz.tmp"
    mv "$outdir/vmlinuz.tmp" "$outdir/vmlinuz"
    printf '%s %s\n' "$pkg" "$(dpkg-deb -f "$deb" Version)" >"$outdir/kernel-package.txt"
    log "kernel: $pkg ($(basename "$vmlinuz"))"
}

write_init() {
    cat >"$1" <<'EOF'
#!/bin/busybox sh
# vmmig test guest: heartbeat + data checksum on the serial console. PID 1: must never exit.
/bin/busybox mkdir -p /proc /sys /dev /tmpfs /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
mount -t tmpfs -o size=90% tmpfs /tmpfs

out=/dev/ttyS0
[ -c "$out" ] || out=/dev/console
exec >"$out" 2>&1 </dev/null

data_mb=32
write_mb=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmmig_data_mb=*) data_mb=${arg#*=} ;;
        vmmig_write_mb=*) write_mb=${arg#*=} ;;
    esac
done

up() { read -r u _ </proc/uptime; echo "$u"; }

echo "GUEST INIT $(up) data_mb=$data_mb write_mb=$write_mb"
dd if=/dev/urandom of=/tmpfs/data bs=1M count="$data_mb" 2>/dev/null
sum=$(md5sum /tmpfs/data | cut -d' ' -f1)
echo "DATA SUM $sum $(up)"

if [ "$write_mb" -gt 0 ] 2>/dev/null; then
    dd if=/dev/zero of=/tmpfs/scratch bs=1M count="$write_mb" 2>/dev/null
    (
        while :; do
            dd if=/dev/urandom of=/tmpfs/scratch bs=1M count="$write_mb" conv=notrunc 2>/dev/null
            sleep 1
        done
    ) &
    echo "WRITER STARTED $write_mb MB/s pid $!"
fi

n=0
while :; do
    n=$((n + 1))
    echo "HEARTBEAT $n $(up)"
    if [ $((n % 3)) -eq 0 ]; then
        now=$(md5sum /tmpfs/data | cut -d' ' -f1)
        if [ "$now" = "$sum" ]; then echo "DATA OK $n"; else echo "DATA BAD $n $now"; fi
    fi
    sleep 1
done
EOF
    chmod 0755 "$1"
}

build_initrd() {
    local root=$scratch/initramfs
    mkdir -p "$root"/{bin,dev,proc,sys,tmpfs}
    install -m 0755 /bin/busybox "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    write_init "$root/init"
    # /dev/console must exist before devtmpfs is mounted, or the kernel has no stdio for /init.
    mknod -m 0600 "$root/dev/console" c 5 1 2>/dev/null || true
    (cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner=0:0) \
        | gzip -9 -n >"$outdir/initrd.gz.tmp"
    mv "$outdir/initrd.gz.tmp" "$outdir/initrd.gz"
}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
chmod 755 "$scratch"  # lets apt-get download run as _apt in $scratch/kernel
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
ensure_host_packages
file_is_static /bin/busybox || die "/bin/busybox is not static (install busybox-static)"
fetch_kernel
build_initrd
printf 'vmlinuz=%s\ninitrd=%s\n' "$outdir/vmlinuz" "$outdir/initrd.gz"
