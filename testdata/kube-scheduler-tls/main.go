// topoplace's extender over HTTPS, called by kube-scheduler's own extender client.
//
// Built by .ci/kube-scheduler from the vendored kube-scheduler v1.20.5 in
// ../shared/kube-scheduler-v1.20, as a `go build -overlay` that puts this file in place of
// cmd/extcheck/main.go (the harness's tree is not modified). It:
//   - makes a CA, a server certificate for localhost signed by it, a client certificate it
//     signed (kube-scheduler's), and a second CA with a client certificate of its own;
//   - starts `topoplace serve --cluster ... --tls-cert --tls-key --client-ca` on loopback;
//   - takes the project's shipped extender entry (-entry, JSON, from
//     scheduler-config/extender/kube-scheduler-config.yaml), points its urlPrefix at that
//     server and its tlsConfig at the generated files, writes it into a
//     kubescheduler.config.k8s.io/v1beta1 file and loads that with kube-scheduler's own loader;
//   - builds kube-scheduler's HTTPExtender from it (pkg/scheduler/core/extender.go, whose
//     transport is client-go's TLSConfigFor) and calls filter, prioritize and bind as the
//     scheduling loop does;
//   - then the same client without a certificate, with the other CA's certificate, and trusting
//     the other CA: each must fail.
//
// Prints one line per check and a verdict; exits 0 only if every check passed.
package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	configv1alpha1 "k8s.io/component-base/config/v1alpha1"
	"k8s.io/component-base/logs"
	kubeschedulerconfigv1beta1 "k8s.io/kube-scheduler/config/v1beta1"
	schedconfig "k8s.io/kubernetes/cmd/kube-scheduler/app/config"
	schedoptions "k8s.io/kubernetes/cmd/kube-scheduler/app/options"
	kubeschedulerconfig "k8s.io/kubernetes/pkg/scheduler/apis/config"
	kubeschedulerscheme "k8s.io/kubernetes/pkg/scheduler/apis/config/scheme"
	"k8s.io/kubernetes/pkg/scheduler/core"
)

type authority struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

var serial int64 = 1

func newKey() *ecdsa.PrivateKey {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		fatal("key: %v", err)
	}
	return key
}

func certPEM(der []byte) []byte { return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}) }

func keyPEM(key *ecdsa.PrivateKey) []byte {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		fatal("key: %v", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func newAuthority(name string) *authority {
	key := newKey()
	serial++
	template := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		fatal("CA: %v", err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &authority{cert: cert, key: key, pem: certPEM(der)}
}

// leaf signs a certificate for `name`: a server's (localhost, 127.0.0.1) or a client's.
func (a *authority) leaf(name string, server bool) (certFile, keyFile []byte) {
	key := newKey()
	serial++
	template := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature,
	}
	if server {
		template.DNSNames = []string{"localhost"}
		template.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
		template.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	} else {
		template.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, template, a.cert, &key.PublicKey, a.key)
	if err != nil {
		fatal("leaf: %v", err)
	}
	return certPEM(der), keyPEM(key)
}

// server is the topoplace process once started; every exit stops it.
var server *exec.Cmd

func exit(code int) {
	if server != nil && server.Process != nil {
		server.Process.Kill()
		server.Wait()
	}
	os.Exit(code)
}

func fatal(format string, args ...interface{}) {
	fmt.Printf("FATAL "+format+"\n", args...)
	fmt.Println("TLS VERDICT: FAIL")
	exit(2)
}

func write(dir, name string, data []byte) string {
	path := filepath.Join(dir, name)
	if err := ioutil.WriteFile(path, data, 0o600); err != nil {
		fatal("%s: %v", path, err)
	}
	return path
}

func freePort() int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fatal("port: %v", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// loadSchedulerConfig is kube-scheduler's own loader: decode (strict), default, validate.
func loadSchedulerConfig(path string) (*schedconfig.Config, error) {
	versioned := kubeschedulerconfigv1beta1.KubeSchedulerConfiguration{}
	versioned.DebuggingConfiguration = *configv1alpha1.NewRecommendedDebuggingConfiguration()
	kubeschedulerscheme.Scheme.Default(&versioned)
	internal := kubeschedulerconfig.KubeSchedulerConfiguration{}
	if err := kubeschedulerscheme.Scheme.Convert(&versioned, &internal, nil); err != nil {
		return nil, err
	}
	opts := &schedoptions.Options{ComponentConfig: internal, ConfigFile: path, Logs: logs.NewOptions()}
	c := &schedconfig.Config{}
	if err := opts.ApplyTo(c); err != nil {
		return nil, err
	}
	return c, nil
}

func readNodes(path string) []*v1.Node {
	data, err := ioutil.ReadFile(path)
	if err != nil {
		fatal("%s: %v", path, err)
	}
	var nodes []*v1.Node
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	for {
		var raw map[string]interface{}
		if err := dec.Decode(&raw); err != nil {
			if err == io.EOF {
				break
			}
			fatal("%s: %v", path, err)
		}
		if raw == nil || raw["kind"] != "Node" {
			continue
		}
		b, _ := json.Marshal(raw)
		var n v1.Node
		if err := json.Unmarshal(b, &n); err != nil {
			fatal("%s: %v", path, err)
		}
		nodes = append(nodes, &n)
	}
	return nodes
}

var failures []string

func check(ok bool, format string, args ...interface{}) {
	line := fmt.Sprintf(format, args...)
	if ok {
		fmt.Println("PASS " + line)
	} else {
		fmt.Println("FAIL " + line)
		failures = append(failures, line)
	}
}

func main() {
	var (
		topoplace = flag.String("topoplace", "", "the topoplace binary")
		cluster   = flag.String("cluster", "", "the cluster file `serve --cluster` reads")
		nodesPath = flag.String("nodes", "", "YAML of the same nodes as Node objects")
		entryPath = flag.String("entry", "", "the shipped extender entry, as JSON")
		work      = flag.String("work", "", "a folder for certificates, configuration and logs")
	)
	flag.Parse()
	os.MkdirAll(*work, 0o755)

	ca, other := newAuthority("topoplace extender CA"), newAuthority("someone else's CA")
	serverCert, serverKey := ca.leaf("topoplace-extender", true)
	clientCert, clientKey := ca.leaf("kube-scheduler", false)
	strangerCert, strangerKey := other.leaf("kube-scheduler", false)
	files := map[string]string{}
	for name, data := range map[string][]byte{
		"ca.crt": ca.pem, "other-ca.crt": other.pem, "server.crt": serverCert, "server.key": serverKey,
		"client.crt": clientCert, "client.key": clientKey, "stranger.crt": strangerCert, "stranger.key": strangerKey,
	} {
		files[name] = write(*work, name, data)
	}

	port := freePort()
	logFile, _ := os.Create(filepath.Join(*work, "topoplace.log"))
	serve := exec.Command(*topoplace, "serve", "--cluster", *cluster, "--listen", fmt.Sprintf("127.0.0.1:%d", port),
		"--no-grpc", "--tls-cert", files["server.crt"], "--tls-key", files["server.key"], "--client-ca", files["ca.crt"])
	serve.Stdout, serve.Stderr = logFile, logFile
	if err := serve.Start(); err != nil {
		fatal("starting topoplace: %v", err)
	}
	server = serve
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(ca.pem)
	probe := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	up := false
	for i := 0; i < 100 && !up; i++ {
		if resp, err := probe.Get(fmt.Sprintf("https://localhost:%d/healthz", port)); err == nil {
			up = resp.StatusCode == 200
			resp.Body.Close()
		}
		if !up {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if !up {
		fatal("topoplace did not come up over HTTPS (see %s)", logFile.Name())
	}
	check(true, "the kubelet's kind of probe (HTTPS, no client certificate) reads /healthz")

	// The shipped entry, pointed at this server and these files.
	raw, err := ioutil.ReadFile(*entryPath)
	if err != nil {
		fatal("%s: %v", *entryPath, err)
	}
	var entry map[string]interface{}
	if err := json.Unmarshal(raw, &entry); err != nil {
		fatal("%s: %v", *entryPath, err)
	}
	check(entry["enableHTTPS"] == true, "the shipped entry sets enableHTTPS: true")
	shippedTLS, _ := entry["tlsConfig"].(map[string]interface{})
	check(shippedTLS != nil && shippedTLS["certFile"] != nil && shippedTLS["keyFile"] != nil && shippedTLS["caFile"] != nil &&
		shippedTLS["insecure"] != true, "the shipped entry's tlsConfig has certFile, keyFile and caFile, not insecure")
	entry["urlPrefix"] = fmt.Sprintf("https://localhost:%d", port)
	tlsConfig := map[string]interface{}{"certFile": files["client.crt"], "keyFile": files["client.key"], "caFile": files["ca.crt"]}
	entry["tlsConfig"] = tlsConfig
	config := map[string]interface{}{
		"apiVersion": "kubescheduler.config.k8s.io/v1beta1", "kind": "KubeSchedulerConfiguration",
		"leaderElection": map[string]interface{}{"leaderElect": false}, "percentageOfNodesToScore": 100,
		"profiles": []interface{}{map[string]interface{}{"schedulerName": "default-scheduler"}},
		"extenders": []interface{}{entry},
	}
	configJSON, _ := json.MarshalIndent(config, "", "  ")
	configPath := write(*work, "kube-scheduler-config.yaml", configJSON)
	loaded, err := loadSchedulerConfig(configPath)
	if err != nil {
		fatal("kube-scheduler rejected the configuration: %v", err)
	}
	extenderConfig := loaded.ComponentConfig.Extenders[0]
	check(extenderConfig.EnableHTTPS && extenderConfig.TLSConfig != nil, "kube-scheduler loaded the entry with HTTPS and its tlsConfig")

	nodes := readNodes(*nodesPath)
	pod := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "tls-probe", Namespace: "default", UID: types.UID("tls-probe-uid")},
		Spec: v1.PodSpec{SchedulerName: "default-scheduler", Containers: []v1.Container{{Name: "main",
			Resources: v1.ResourceRequirements{Limits: v1.ResourceList{"nvidia.com/gpu": resource.MustParse("1")}}}}},
	}
	extender, err := core.NewHTTPExtender(&extenderConfig)
	if err != nil {
		fatal("kube-scheduler's HTTPExtender: %v", err)
	}
	passing, failed, err := extender.Filter(pod, nodes)
	check(err == nil && len(passing) > 0, "filter over mutual TLS: %d of %d nodes pass (%d failed), error %v", len(passing), len(nodes), len(failed), err)
	if err == nil && len(passing) > 0 {
		scores, weight, err := extender.Prioritize(pod, passing)
		count := 0
		if scores != nil {
			count = len(*scores)
		}
		check(err == nil && count == len(passing), "prioritize over mutual TLS: %d scores, weight %d, error %v", count, weight, err)
		if extender.IsBinder() {
			err = extender.Bind(&v1.Binding{ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID},
				Target: v1.ObjectReference{Kind: "Node", Name: passing[0].Name}})
			check(err == nil, "bind over mutual TLS to %s: error %v", passing[0].Name, err)
		}
	}

	// The same client with what it must not get through with.
	refused := func(what string, mutate func(c *kubeschedulerconfig.ExtenderTLSConfig), says string) {
		c := extenderConfig
		t := *extenderConfig.TLSConfig
		mutate(&t)
		c.TLSConfig = &t
		e, err := core.NewHTTPExtender(&c)
		if err != nil {
			check(false, "%s: building the client: %v", what, err)
			return
		}
		other := pod.DeepCopy()
		other.Name, other.UID = "forged", types.UID("forged-uid")
		_, _, err = e.Filter(other, nodes)
		check(err != nil && strings.Contains(err.Error(), says), "%s: refused (%v)", what, err)
	}
	refused("no client certificate", func(t *kubeschedulerconfig.ExtenderTLSConfig) { t.CertFile, t.KeyFile = "", "" }, "code 403")
	refused("a client certificate of another CA", func(t *kubeschedulerconfig.ExtenderTLSConfig) {
		t.CertFile, t.KeyFile = files["stranger.crt"], files["stranger.key"]
	}, "tls")
	refused("a server certificate kube-scheduler does not trust", func(t *kubeschedulerconfig.ExtenderTLSConfig) {
		t.CAFile = files["other-ca.crt"]
	}, "certificate")

	// What the server holds after it all: one GPU, the probe pod's.
	client := &http.Client{Timeout: 5 * time.Second}
	if pair, err := tls.LoadX509KeyPair(files["client.crt"], files["client.key"]); err == nil {
		client.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{pair}}}
	}
	if resp, err := client.Get(fmt.Sprintf("https://localhost:%d/state", port)); err == nil {
		body, _ := ioutil.ReadAll(resp.Body)
		resp.Body.Close()
		ioutil.WriteFile(filepath.Join(*work, "state.json"), body, 0o644)
		check(resp.StatusCode == 200 && !strings.Contains(string(body), "forged"), "/state with the client certificate: %d, nothing of the refused requests", resp.StatusCode)
	} else {
		check(false, "/state with the client certificate: %v", err)
	}

	if len(failures) > 0 {
		fmt.Printf("TLS VERDICT: FAIL (%d checks failed)\n", len(failures))
		exit(1)
	}
	fmt.Println("TLS VERDICT: PASS (kube-scheduler v1.20's extender client and topoplace agree over mutual TLS)")
	exit(0)
}
