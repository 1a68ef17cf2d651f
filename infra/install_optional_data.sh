#!/usr/bin/env bash
# Optional real data from Debian: ITK's example T1 MRI with a 7-class k-means segmentation.
# Best effort: without root or without the package, the catalog reports the source as
# unavailable and skips it.
set -u
if [ -f /usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz ]; then exit 0; fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null; then
  echo "optional: insighttoolkit5-examples not installed (needs root and apt-get); its catalog entry will be skipped"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
timeout 300 apt-get update -qq >/dev/null 2>&1
timeout 300 apt-get install -y -qq insighttoolkit5-examples >/dev/null 2>&1 \
  && echo "optional: installed insighttoolkit5-examples" \
  || echo "optional: insighttoolkit5-examples unavailable; its catalog entry will be skipped"
exit 0
