"""Nova-level latencies of FatboxDriver against a real fatboxd (warm image cache):
spawn (driver call -> RUNNING), destroy, and get_info over many instances, each beside the
same work done with direct API calls, so the shim's overhead shows. Prints a markdown table.
Env: FATBOX_BENCH_SPAWNS (5), FATBOX_BENCH_INSTANCES (10), FATBOX_BENCH_GETINFO (200).
"""

import os
import statistics
import time

from nova.network import model as network_model
from novaobjs import DriverTestBase


def _ms(xs):
    xs = sorted(xs)
    return (
        f"{statistics.mean(xs) * 1e3:.1f}",
        f"{xs[len(xs) // 2] * 1e3:.1f}",
        f"{xs[min(len(xs) - 1, int(len(xs) * 0.95))] * 1e3:.1f}",
    )


class BenchDriver(DriverTestBase):
    def test_bench(self):
        spawns = int(os.environ.get("FATBOX_BENCH_SPAWNS", "5"))
        n_inst = int(os.environ.get("FATBOX_BENCH_INSTANCES", "10"))
        n_info = int(os.environ.get("FATBOX_BENCH_GETINFO", "200"))
        rows = []
        c = self.fb.client()

        # Warm the image cache (layers extracted) once.
        warm = self._instance(hostname="bench-warm")
        self._spawn(warm)
        self.driver.destroy(self.ctxt, warm, [])

        spawn_t, destroy_t, api_spawn_t, api_destroy_t = [], [], [], []
        for i in range(spawns):
            inst = self._instance(hostname=f"bench-{i}")
            spawn_t.append(self._spawn(inst))
            t = time.monotonic()
            self.driver.destroy(self.ctxt, inst, [])
            destroy_t.append(time.monotonic() - t)
            # The same through the API alone (no metadata drive, no Nova objects).
            t = time.monotonic()
            c.create({"name": f"api-{i}", "image": self._image_meta().id,
                      "flavor": {"vcpus": 1, "memory_mb": 512, "root_gb": 2}})
            while c.show(f"api-{i}")["state"] != "running":
                time.sleep(0.02)
            api_spawn_t.append(time.monotonic() - t)
            t = time.monotonic()
            c.delete(f"api-{i}")
            api_destroy_t.append(time.monotonic() - t)
        rows.append(("spawn -> RUNNING (driver)", spawns, *_ms(spawn_t)))
        rows.append(("create -> running (API)", spawns, *_ms(api_spawn_t)))
        rows.append(("destroy (driver)", spawns, *_ms(destroy_t)))
        rows.append(("delete (API)", spawns, *_ms(api_destroy_t)))

        insts = []
        for i in range(n_inst):
            inst = self._instance(hostname=f"info-{i}")
            self.driver.spawn(self.ctxt, inst, self._image_meta(), [], None, {},
                              network_info=network_model.NetworkInfo([]))
            insts.append(inst)
        info_t, show_t = [], []
        for k in range(n_info):
            inst = insts[k % n_inst]
            t = time.monotonic()
            self.driver.get_info(inst)
            info_t.append(time.monotonic() - t)
            t = time.monotonic()
            c.show(inst.uuid)
            show_t.append(time.monotonic() - t)
        rows.append((f"get_info ({n_inst} instances, driver)", n_info, *_ms(info_t)))
        rows.append((f"GET /v1/instances/ID (API)", n_info, *_ms(show_t)))
        t = time.monotonic()
        for _ in range(20):
            self.driver.list_instance_uuids()
        rows.append((f"list_instance_uuids ({n_inst})", 20, f"{(time.monotonic() - t) / 20 * 1e3:.1f}", "", ""))

        print("\n| operation | n | mean ms | p50 ms | p95 ms |\n|---|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(str(x) for x in r) + " |")
