#!/usr/bin/env bash
# Build, and make a local base for, the project image (Dockerfile); called by `make image`,
# `make base-image` and `make image-clean`.
#
#   pipeline/image.sh build   docker build where a Docker engine answers, else buildah bud
#   pipeline/image.sh base    a local python base from Debian packages (mmdebstrap), for
#                             machines that cannot pull the Dockerfile's FROM image
#   pipeline/image.sh clean   remove the image, the local base and buildah's containers
#   pipeline/image.sh buildah ARGS...   buildah on the same storage (the in-image test uses it)
#
# Settings (environment): IMAGE (the tag; components/image.py by default), TORCH (cuda|cpu),
# IMAGE_STORAGE / IMAGE_RUNROOT (buildah's --root/--runroot: containers/storage's own places by
# default), IMAGE_BUILDER (docker|buildah: the first that works by default).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=localhost/python-base:bookworm
SUITE=bookworm
TORCH=${TORCH:-cuda}
IMAGE=${IMAGE:-$(sed -n 's/^IMAGE = "\(.*\)"$/\1/p' components/image.py)}

die() { echo "make image: $*" >&2; exit 1; }
say() { echo "make image: $*" >&2; }

if [ "$(id -u)" = 0 ]; then
    IMAGE_STORAGE=${IMAGE_STORAGE:-/var/lib/containers/storage}
    IMAGE_RUNROOT=${IMAGE_RUNROOT:-/run/containers/storage}
else
    IMAGE_STORAGE=${IMAGE_STORAGE:-${XDG_DATA_HOME:-$HOME/.local/share}/containers/storage}
    IMAGE_RUNROOT=${IMAGE_RUNROOT:-${XDG_RUNTIME_DIR:-/tmp/containers-$(id -u)}/containers}
fi

# buildah ignores STORAGE_DRIVER: the driver and both folders are always passed.
buildah_() {
    buildah --storage-driver overlay --root "$IMAGE_STORAGE" --runroot "$IMAGE_RUNROOT" "$@"
}

builder() {
    case "${IMAGE_BUILDER:-}" in
        docker | buildah) echo "$IMAGE_BUILDER"; return ;;
        "") ;;
        *) die "IMAGE_BUILDER must be docker or buildah, not '$IMAGE_BUILDER'" ;;
    esac
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        echo docker
    elif command -v buildah >/dev/null 2>&1; then
        echo buildah
    else
        die "neither a Docker engine ('docker info' failed or no docker) nor buildah here; install one (Debian: apt-get install buildah mmdebstrap)"
    fi
}

# sha256 of a file, for the image's labels.
sha() { sha256sum "$1" | cut -d' ' -f1; }

labels() {
    local commit
    commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    if [ "$commit" != unknown ] && [ -n "$(git status --porcelain -- Dockerfile pyproject.toml README.md src components/__init__.py components/image.py components/trainjob.py requirements-runtime.lock requirements-torch.txt requirements-torch-cpu.txt 2>/dev/null)" ]; then
        commit="$commit-dirty"  # the build context differs from the commit
    fi
    printf -- '--label\0org.opencontainers.image.revision=%s\0' "$commit"
    printf -- '--label\0io.switchprune.torch=%s\0' "$TORCH"
    printf -- '--label\0io.switchprune.requirements-runtime.lock.sha256=%s\0' "$(sha requirements-runtime.lock)"
    printf -- '--label\0io.switchprune.requirements-torch.sha256=%s\0' \
        "$(sha "$([ "$TORCH" = cpu ] && echo requirements-torch-cpu.txt || echo requirements-torch.txt)")"
}

from_image() { sed -n 's/^FROM[[:space:]]\{1,\}\([^[:space:]]\{1,\}\).*/\1/p' Dockerfile | head -1; }

build() {
    [ -n "$IMAGE" ] || die "no IMAGE = \"...\" line in components/image.py"
    local how args=() from
    how=$(builder)
    while IFS= read -r -d '' a; do args+=("$a"); done < <(labels)
    if [ "$how" = docker ]; then
        say "building $IMAGE with docker (TORCH=$TORCH)"
        exec docker build --build-arg "TORCH=$TORCH" "${args[@]}" -t "$IMAGE" .
    fi
    from=$(from_image)
    if buildah_ inspect --type image "$from" >/dev/null 2>&1 || timeout 120 buildah --storage-driver overlay --root "$IMAGE_STORAGE" --runroot "$IMAGE_RUNROOT" pull -q "$from" >/dev/null 2>&1; then
        say "building $IMAGE with buildah from $from (TORCH=$TORCH)"
    elif buildah_ inspect --type image "$BASE" >/dev/null 2>&1; then
        say "cannot pull $from: building $IMAGE from the local base $BASE (Debian's python, made by 'make base-image') (TORCH=$TORCH)"
        args+=(--from "$BASE")
    else
        say "cannot pull $from and there is no local base $BASE: run 'make base-image' first"
        exit 3  # told apart from a failed build: .ci/run makes the base then
    fi
    buildah_ bud --isolation chroot --layers --build-arg "TORCH=$TORCH" "${args[@]}" -t "$IMAGE" .
    say "built $IMAGE ($(buildah_ images --format '{{.Size}}' "$IMAGE" | head -1))"
}

base() {
    command -v buildah >/dev/null 2>&1 || die "buildah is not installed (Debian: apt-get install buildah mmdebstrap)"
    command -v mmdebstrap >/dev/null 2>&1 || die "mmdebstrap is not installed (Debian: apt-get install buildah mmdebstrap)"
    local ca
    scratch=$(mktemp -d)  # global, like ctr: the EXIT trap reads them after base returns
    ctr=""
    # shellcheck disable=SC2317  # called by the trap
    cleanup() { [ -z "$ctr" ] || buildah_ rm "$ctr" >/dev/null 2>&1 || true; rm -rf "$scratch"; }
    trap cleanup EXIT
    say "making $BASE: Debian $SUITE minbase with python3, python3-venv, pip, ca-certificates"
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        "$SUITE" "$scratch/rootfs.tar"
    ctr=$(buildah_ from scratch)
    buildah_ add "$ctr" "$scratch/rootfs.tar" / >/dev/null
    # pip in the build trusts what pip here trusts (a proxy's CA, for one).
    ca=${PIP_CERT:-${SSL_CERT_FILE:-}}
    if [ -n "$ca" ] && [ -f "$ca" ]; then
        buildah_ copy "$ctr" "$ca" /usr/local/share/ca-certificates/host-bundle.crt >/dev/null
        buildah_ run --isolation chroot "$ctr" -- update-ca-certificates >/dev/null 2>&1
    fi
    # Debian's python is externally managed: a venv first on PATH stands in for the official
    # image's /usr/local python (with `python` and `pip`).
    buildah_ run --isolation chroot "$ctr" -- python3 -m venv /opt/venv
    buildah_ config --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env VIRTUAL_ENV=/opt/venv --env LANG=C.UTF-8 --cmd python3 "$ctr"
    buildah_ commit -q "$ctr" "$BASE" >/dev/null
    say "made $BASE ($(buildah_ images --format '{{.Size}}' "$BASE" | head -1))"
}

clean() {
    command -v buildah >/dev/null 2>&1 || { say "buildah is not installed: nothing to remove"; return; }
    buildah_ rm --all >/dev/null 2>&1 || true
    buildah_ rmi -f "$IMAGE" "$BASE" >/dev/null 2>&1 || true
    buildah_ rmi --prune >/dev/null 2>&1 || true
    say "removed $IMAGE, $BASE and buildah's containers from $IMAGE_STORAGE"
}

case "${1:-}" in
    build) build ;;
    base) base ;;
    clean) clean ;;
    buildah) shift; buildah_ "$@" ;;
    *) echo "usage: $0 build|base|clean|buildah ARGS..." >&2; exit 2 ;;
esac
