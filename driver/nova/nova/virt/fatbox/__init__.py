"""fatbox compute driver: ``compute_driver = fatbox.FatboxDriver``."""

from nova.virt.fatbox import driver

FatboxDriver = driver.FatboxDriver
