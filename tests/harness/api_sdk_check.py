"""openstacksdk against `kiln serve`: the calls backup and orchestration scripts make.

Usage: api_sdk_check.py CLOUD VOLUME_NAME INSTANCE_UUID
Attaches the volume through the SDK, snapshots it with force=True, waits for the
snapshot with wait_for_status, deletes it and waits with wait_for_delete (which relies on
404), detaches, and prints one line per step. Exits non-zero on the first failure.
"""
import sys

import openstack

cloud, volume_name, instance = sys.argv[1:4]
conn = openstack.connect(cloud=cloud)
bs = conn.block_storage

vol = bs.find_volume(volume_name, ignore_missing=False)
bs.attach_volume(vol, "/dev/vdc", instance=instance)
vol = bs.wait_for_status(bs.get_volume(vol.id), status="in-use", wait=30)
print(f"attached: {vol.status} {[a['server_id'] for a in vol.attachments]}")

snap = bs.create_snapshot(volume_id=vol.id, force=True, name="sdk-snap")
snap = bs.wait_for_status(snap, status="available", failures=["error"], wait=30)
print(f"snapshot: {snap.status} of {snap.volume_id} size {snap.size}")

found = [s.id for s in bs.snapshots(details=True, volume_id=vol.id) if s.name == "sdk-snap"]
assert found == [snap.id], f"snapshot list by volume_id: {found}"

bs.delete_snapshot(snap)
bs.wait_for_delete(snap, wait=30)
assert bs.find_snapshot(snap.id) is None, "deleted snapshot still found"
print("snapshot deleted: 404")

attachment = vol.attachments[0]["attachment_id"]
bs.detach_volume(vol, attachment)
vol = bs.wait_for_status(bs.get_volume(vol.id), status="available", wait=30)
print(f"detached: {vol.status} {vol.attachments}")
