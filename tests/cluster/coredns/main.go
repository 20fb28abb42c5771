// CoreDNS with only the plugins the test cluster's DNS uses (cluster.local from the API
// server, on the node's address only, health and readiness), the way CoreDNS documents custom builds: the plugins are
// imported here and their order set in dnsserver.Directives. The full build's ~60 plugins
// (cloud DNS providers among them) would add minutes and modules for nothing.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	// The order of CoreDNS' plugin.cfg: bind (listen only on the node's own address) first,
	// cache before kubernetes.
	dnsserver.Directives = []string{"bind", "ready", "health", "errors", "log", "cache", "kubernetes"}
}

func main() { coremain.Run() }
