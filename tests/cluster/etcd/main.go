// Command etcd is the upstream etcd server (go.etcd.io/etcd/server/v3/etcdmain),
// built here because no etcd release binary can be downloaded on the project's machines.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
