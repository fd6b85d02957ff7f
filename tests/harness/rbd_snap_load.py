#!/usr/bin/python3
"""The raw primitive of `kiln bench api` on RBD, without kiln: THREADS threads for SECS
seconds, thread t working on image t % IMAGES, doing rbd_snap_create + rbd_snap_remove (the
librbd calls kiln's RBD driver makes for a snapshot create and delete), one open handle per
image shared by every thread (as one kiln node keeps), in one process. With as many threads
as images each image sees one operation at a time, as kiln's per-volume locks allow; with
more, several at once, which kiln never does.

    rbd_snap_load.py CEPH_CONF POOL IMAGES THREADS SECS   -> one JSON line
"""
import json, sys, threading, time, uuid
import rados, rbd

conf, pool, n_images, n_threads, secs = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
cluster = rados.Rados(conffile=conf)
cluster.connect(timeout=30)
ioctx = cluster.open_ioctx(pool)
names = [f"rawbench-{uuid.uuid4().hex[:8]}-{i}" for i in range(n_images)]
for n in names:
    rbd.RBD().create(ioctx, n, 1 << 30, old_format=False)  # the cluster's default features, as kiln
images = [rbd.Image(ioctx, n) for n in names]
lat, lock = [], threading.Lock()
deadline = time.monotonic() + secs

def worker(t):
    mine, img = [], images[t % len(images)]
    while time.monotonic() < deadline:
        snap = f"snapshot-{uuid.uuid4()}"
        t0 = time.monotonic()
        img.create_snap(snap)
        t1 = time.monotonic()
        img.remove_snap(snap)
        mine.append(((t1 - t0) * 1e3, (time.monotonic() - t1) * 1e3))
    with lock:
        lat.extend(mine)

start = time.monotonic()
threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
for t in threads: t.start()
for t in threads: t.join()
took = time.monotonic() - start
for img in images: img.close()
for n in names: rbd.RBD().remove(ioctx, n)
ioctx.close(); cluster.shutdown()
c = sorted(x[0] for x in lat); d = sorted(x[1] for x in lat)
p = lambda v, q: v[round((len(v) - 1) * q)] if v else 0
print(json.dumps({"threads": n_threads, "images": n_images, "duration_s": round(took, 1),
                  "creates": len(lat), "deletes": len(lat), "ops_per_s": round(2 * len(lat) / took, 1),
                  "create_p50_ms": round(p(c, .5), 2), "create_p99_ms": round(p(c, .99), 2),
                  "delete_p50_ms": round(p(d, .5), 2)}))
