// The etcd server for the local control plane (scripts/control-plane): etcd's own entry point,
// built from its Go module at the version the pinned Kubernetes release pairs with.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
